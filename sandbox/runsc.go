package sandbox

// OCI runtimes.
const (
	RuntimeRunc  = "runc"
	RuntimeRunsc = "runsc"
)

// gVisor (runsc) as the runtime.
//
// runsc runs the sandbox's processes on gVisor's Sentry, a kernel in user
// space: system calls never reach the host kernel directly, which is the
// stronger isolation for untrusted code. It is built from gvisor.dev's Go
// module (scripts/gvisor.sh) and chosen per node (chalkd --runtime runsc).
// What differs from runc:
//
//   - init's process API socket is made inside the sandbox in a bind-mounted
//     host directory; with --host-uds=create the Sentry creates it as a host
//     socket, so chalkd reaches init exactly as under runc.
//   - The network: --network=sandbox (runsc's default) takes over the
//     interfaces of the namespace the spec names (sandboxnet's veth with its
//     addresses and routes) with gVisor's own network stack; the node's
//     nftables rules see the same packets on the host side.
//   - --overlay2=none: the sandbox's writes go through gVisor's file proxy
//     into the overlay upper dir on the quota tmpfs, as under runc (image
//     builds take their layers from it; the disk quota holds). gVisor's
//     default would keep them in its own memory-backed file store.
//   - User namespaces are not used (chalkd turns them off): the Sentry and
//     its file proxy already run unprivileged in namespaces of their own.
func runtimeArgs(runtime string) []string {
	if runtime == RuntimeRunsc {
		return []string{"--host-uds=create", "--network=sandbox", "--overlay2=none"}
	}
	return nil
}
