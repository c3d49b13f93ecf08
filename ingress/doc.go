// Package ingress serves exposed sandbox ports on chalkd's ingress listener:
// a reverse proxy routing by host name (<port>-<sandbox>.<domain>) or by
// path (/s/<sandbox>/<port>/...) to the sandbox's address, streaming in both
// directions (HTTP/1.1, HTTP/2 on TLS, WebSocket upgrades, server-sent
// events), with private routes opened only by an API key of the sandbox's
// org or a signed, expiring token scoped to the sandbox and port.
package ingress
