// Package api is chalkd's control plane API: Connect handlers for the services in
// proto/chalk/compute/v1, authentication (user API tokens and workload identity
// tokens), authorisation, validation, and the sandbox lifecycle (persisted state,
// timeouts, restart reconciliation). It drives the node agent through the Node
// interface.
//
// This file is where handler errors become wire codes (through errdefs/errconnect,
// which holds the mapping both ways).
package api

import (
	"context"

	"connectrpc.com/connect"

	"github.com/chalkcompute/chalkcompute/errdefs/errconnect"
)

// toConnect converts an error to a Connect error with the code of its errdefs
// class (errconnect holds the one mapping, both ways).
func toConnect(err error) error { return errconnect.ToConnect(err) }

// errorInterceptor maps every handler error through toConnect.
type errorInterceptor struct{}

var _ connect.Interceptor = errorInterceptor{}

func (errorInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		resp, err := next(ctx, req)
		return resp, toConnect(err)
	}
}

func (errorInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (errorInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		return toConnect(next(ctx, conn))
	}
}
