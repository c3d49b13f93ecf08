"""Seed 000: two sandboxes joined by a WireGuard tunnel."""
from chalkcompute import SandboxClient, Image, Tunnel

client = SandboxClient()
# Create two sandboxes that can reach each other
tunnel = Tunnel(name="worker-mesh")
sandbox_a = client.create(
    image=Image.debian_slim(),
    tunnels=[tunnel],
)
sandbox_b = client.create(
    image=Image.debian_slim(),
    tunnels=[tunnel],
)
# sandbox_a and sandbox_b can now communicate over
# their tunnel addresses without traversing the public internet.

print(sandbox_a.id, sandbox_b.id)
sandbox_a.terminate()
sandbox_b.terminate()
