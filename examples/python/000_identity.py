"""Seed 000: every sandbox runs with its own workload identity."""
from chalkcompute import SandboxClient, Image

client = SandboxClient()
sandbox = client.create(image=Image.debian_slim())
# The sandbox is running with its own identity —
# it can authenticate to Chalk APIs without additional configuration.
result = sandbox.exec("chalk", "query", "--in", "user.id=1", "--out", "user.score")

print("exit code:", result.exit_code)
print(result.stdout, result.stderr, sep="")
print(sandbox.exec("chalk", "whoami").stdout, end="")
sandbox.terminate()
