package api

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"

	"github.com/chalkcompute/chalkcompute/errdefs"
	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	c "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/internal/reqlimit"
	"github.com/chalkcompute/chalkcompute/store"
)

// Authorisation is decided here, once per RPC, before the handler runs:
// rules holds one rule per procedure (TestEveryRPCHasARule fails the build
// of a new RPC without one). The interceptor checks the caller's role, then
// that the object the request names belongs to the caller's org (another
// org's object is not_found: its existence does not leak). Handlers still
// scope every query to the caller's org; this is the single place that
// says who may call what.

// objectKind is what a request field names.
type objectKind int

const (
	objNone      objectKind = iota // no object, or one the handler creates in the caller's org
	objSandbox                     // a sandbox id
	objPolicy                      // a network policy name
	objTunnel                      // a tunnel name
	objMCPServer                   // an MCP server name
	objImage                       // an image reference or content hash
	objKey                         // an API key id or prefix
	objOrg                         // an org name ("" = the caller's); another org: node admin only
)

// rule says who may call one procedure.
type rule struct {
	role      store.Role // minimum role of a user's key
	object    objectKind // what field names
	field     string     // the request field naming the object
	workload  bool       // sandboxes (workload tokens) may call it, for themselves
	nodeAdmin bool       // only the node's bootstrap admin
	quiet     bool       // not audited: data-plane calls made many times per action (stdin chunks, uploads)
}

const (
	roleViewer = store.RoleViewer
	roleMember = store.RoleMember
	roleAdmin  = store.RoleAdmin
)

// rules: one per procedure. Roles follow the proto: a method marked
// NO_SIDE_EFFECTS may be open to viewers, any other needs member or more.
var rules = map[string]rule{
	c.SandboxServiceCreateProcedure:        {role: roleMember},
	c.SandboxServiceGetProcedure:           {role: roleViewer, object: objSandbox, field: "id", workload: true},
	c.SandboxServiceListProcedure:          {role: roleViewer},
	c.SandboxServiceWaitProcedure:          {role: roleViewer, object: objSandbox, field: "id", workload: true},
	c.SandboxServiceTerminateProcedure:     {role: roleMember, object: objSandbox, field: "id"},
	c.SandboxServiceExecProcedure:          {role: roleMember, object: objSandbox, field: "sandbox_id"},
	c.SandboxServiceWriteStdinProcedure:    {role: roleMember, object: objSandbox, field: "sandbox_id", quiet: true},
	c.SandboxServiceSignalExecProcedure:    {role: roleMember, object: objSandbox, field: "sandbox_id"},
	c.SandboxServiceResizeExecProcedure:    {role: roleMember, object: objSandbox, field: "sandbox_id"},
	c.SandboxServiceLogsProcedure:          {role: roleViewer, object: objSandbox, field: "sandbox_id", workload: true},
	c.SandboxServiceReadFileProcedure:      {role: roleViewer, object: objSandbox, field: "sandbox_id"},
	c.SandboxServiceWriteFileProcedure:     {role: roleMember, object: objSandbox, field: "sandbox_id"},
	c.SandboxServiceListFilesProcedure:     {role: roleViewer, object: objSandbox, field: "sandbox_id"},
	c.SandboxServiceRemoveFileProcedure:    {role: roleMember, object: objSandbox, field: "sandbox_id"},
	c.SandboxServiceEgressLogProcedure:     {role: roleViewer, object: objSandbox, field: "sandbox_id", workload: true},
	c.SandboxServiceExposeProcedure:        {role: roleMember, object: objSandbox, field: "sandbox_id"},
	c.SandboxServiceUnexposeProcedure:      {role: roleMember, object: objSandbox, field: "sandbox_id"},
	c.SandboxServiceListExposuresProcedure: {role: roleViewer, object: objSandbox, field: "sandbox_id"},
	c.SandboxServiceSnapshotProcedure:      {role: roleMember, object: objSandbox, field: "sandbox_id"},
	c.SandboxServicePauseProcedure:         {role: roleMember, object: objSandbox, field: "sandbox_id"},
	c.SandboxServiceResumeProcedure:        {role: roleMember, object: objSandbox, field: "sandbox_id"},

	c.ImageServicePullProcedure:       {role: roleMember, object: objImage, field: "ref"},
	c.ImageServiceWarmProcedure:       {role: roleMember, object: objImage, field: "image"},
	c.ImageServiceBuildProcedure:      {role: roleMember},
	c.ImageServiceListProcedure:       {role: roleViewer},
	c.ImageServiceInspectProcedure:    {role: roleViewer, object: objImage, field: "ref"},
	c.ImageServiceRemoveProcedure:     {role: roleMember, object: objImage, field: "ref"},
	c.ImageServiceHasBlobsProcedure:   {role: roleViewer},
	c.ImageServiceUploadBlobProcedure: {role: roleMember, quiet: true},

	c.PolicyServiceCreateProcedure: {role: roleMember},
	c.PolicyServiceUpdateProcedure: {role: roleMember, object: objPolicy, field: "name"},
	c.PolicyServiceGetProcedure:    {role: roleViewer, object: objPolicy, field: "name"},
	c.PolicyServiceListProcedure:   {role: roleViewer},
	c.PolicyServiceDeleteProcedure: {role: roleMember, object: objPolicy, field: "name"},

	c.IdentityServiceWhoAmIProcedure:     {role: roleViewer, workload: true},
	c.IdentityServiceMintTokenProcedure:  {role: roleMember, object: objSandbox, field: "sandbox_id", workload: true},
	c.IdentityServiceRotateKeysProcedure: {role: roleAdmin, nodeAdmin: true},

	c.TunnelServiceApplyProcedure:      {role: roleMember},
	c.TunnelServiceGetProcedure:        {role: roleViewer, object: objTunnel, field: "name"},
	c.TunnelServiceListProcedure:       {role: roleViewer},
	c.TunnelServiceDeleteProcedure:     {role: roleMember, object: objTunnel, field: "name"},
	c.TunnelServiceAddPeerProcedure:    {role: roleMember},
	c.TunnelServiceRemovePeerProcedure: {role: roleMember, object: objTunnel, field: "tunnel"},

	c.McpServiceAddServerProcedure:    {role: roleAdmin},
	c.McpServiceListServersProcedure:  {role: roleViewer},
	c.McpServiceRemoveServerProcedure: {role: roleAdmin, object: objMCPServer, field: "name"},
	c.McpServiceAuditProcedure:        {role: roleAdmin},

	c.TeamServiceCreateOrgProcedure:     {role: roleAdmin, nodeAdmin: true},
	c.NodeAdminServiceListProcedure:     {role: roleAdmin, nodeAdmin: true},
	c.NodeAdminServiceSetStateProcedure: {role: roleAdmin, nodeAdmin: true},
	c.NodeAdminServiceRemoveProcedure:   {role: roleAdmin, nodeAdmin: true},
	c.TeamServiceListOrgsProcedure:      {role: roleViewer},
	c.TeamServiceAddMemberProcedure:     {role: roleAdmin, object: objOrg, field: "org"},
	c.TeamServiceListMembersProcedure:   {role: roleViewer, object: objOrg, field: "org"},
	c.TeamServiceRemoveMemberProcedure:  {role: roleAdmin, object: objOrg, field: "org"},
	c.TeamServiceSetMemberRoleProcedure: {role: roleAdmin, object: objOrg, field: "org"},
	c.TeamServiceCreateKeyProcedure:     {role: roleMember},
	c.TeamServiceListKeysProcedure:      {role: roleViewer},
	c.TeamServiceRevokeKeyProcedure:     {role: roleMember, object: objKey, field: "id"},
	c.TeamServiceGetQuotaProcedure:      {role: roleViewer, object: objOrg, field: "org"},
	c.TeamServiceSetQuotaProcedure:      {role: roleAdmin, object: objOrg, field: "org", nodeAdmin: true},
	c.TeamServiceAuditProcedure:         {role: roleAdmin},
}

// readOnly reports whether the proto marks procedure NO_SIDE_EFFECTS.
func readOnly(procedure string) bool {
	md := methodDescriptor(procedure)
	if md == nil {
		return false
	}
	opts, _ := md.Options().(*descriptorpb.MethodOptions)
	return opts.GetIdempotencyLevel() == descriptorpb.MethodOptions_NO_SIDE_EFFECTS
}

// methodDescriptor finds procedure ("/pkg.Service/Method") in the API's descriptors.
func methodDescriptor(procedure string) protoreflect.MethodDescriptor {
	svc, method, ok := strings.Cut(strings.TrimPrefix(procedure, "/"), "/")
	if !ok {
		return nil
	}
	sd := v1.File_chalk_compute_v1_compute_proto.Services().ByName(protoreflect.Name(strings.TrimPrefix(svc, "chalk.compute.v1.")))
	if sd == nil {
		return nil
	}
	return sd.Methods().ByName(protoreflect.Name(method))
}

// authorize decides whether the caller in ctx may call procedure with msg.
// It returns the object msg names (for the audit trail).
func (s *Server) authorize(ctx context.Context, procedure string, msg proto.Message) (string, error) {
	p, err := caller(ctx)
	if err != nil {
		return "", err
	}
	r, ok := rules[procedure]
	if !ok {
		return "", fmt.Errorf("%s has no authorisation rule: %w", procedure, errdefs.ErrPermissionDenied)
	}
	if msg != nil {
		if err := requestBounds(msg.ProtoReflect()); err != nil {
			return "", err
		}
	}
	object := ""
	if r.field != "" && msg != nil {
		if fd := msg.ProtoReflect().Descriptor().Fields().ByName(protoreflect.Name(r.field)); fd != nil && fd.Kind() == protoreflect.StringKind {
			object = msg.ProtoReflect().Get(fd).String()
		}
	}
	if p.IsWorkload() {
		if !r.workload {
			return object, fmt.Errorf("workload identity %s may not call %s; only users may: %w", p.Subject, procedure, errdefs.ErrPermissionDenied)
		}
	} else {
		if p.Role.Rank() < r.role.Rank() {
			return object, fmt.Errorf("%s needs role %s; key %s of user %s has role %s in org %q: %w",
				procedure, r.role, p.KeyPrefix, p.User, p.Role, p.OrgID, errdefs.ErrPermissionDenied)
		}
		if r.nodeAdmin && !p.NodeAdmin {
			return object, fmt.Errorf("%s needs the node's bootstrap admin: %w", procedure, errdefs.ErrPermissionDenied)
		}
	}
	if object == "" {
		return object, nil
	}
	return object, s.inOrg(ctx, p, r.object, object)
}

// inOrg checks that the object named id belongs to the caller's org;
// another org's (or a missing) object is ErrNotFound.
func (s *Server) inOrg(ctx context.Context, p *Principal, kind objectKind, id string) error {
	var err error
	switch kind {
	case objSandbox:
		var sb *store.Sandbox
		if sb, err = s.store.GetSandbox(ctx, id); err == nil && sb.OrgID != p.OrgID {
			err = fmt.Errorf("sandbox %q: %w", id, errdefs.ErrNotFound)
		}
		if err == nil {
			keepSandbox(ctx, sb)
		}
	case objPolicy:
		_, err = s.store.GetPolicy(ctx, p.OrgID, id)
	case objTunnel:
		_, err = s.store.GetTunnel(ctx, p.OrgID, id)
	case objMCPServer:
		_, err = s.store.GetMCPServer(ctx, p.OrgID, id)
	case objKey:
		_, err = s.store.GetKey(ctx, p.OrgID, id)
	case objImage:
		err = s.imageVisible(ctx, p.OrgID, id)
	case objOrg:
		if id != p.OrgID && !p.NodeAdmin {
			err = fmt.Errorf("org %q: %w", id, errdefs.ErrNotFound)
		}
	}
	return err
}

// imageVisible: an image another org pulled or built (and this org did
// not) is not found; node-seeded and upstream images are visible to all.
func (s *Server) imageVisible(ctx context.Context, org, ref string) error {
	owners, err := s.store.ImageOwners(ctx, ref)
	if err != nil {
		return err
	}
	if len(owners) == 0 {
		return nil
	}
	for _, o := range owners {
		if o == org {
			return nil
		}
	}
	return fmt.Errorf("image %q: %w", ref, errdefs.ErrNotFound)
}

// authzInterceptor applies rules to every call and records every call that
// is not read-only in the caller's org's audit trail. It reads the
// principal that authentication put in the context.
type authzInterceptor struct{ s *Server }

var _ connect.Interceptor = authzInterceptor{}

func (i authzInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		ctx = withAuditSlot(ctx)
		proc := req.Spec().Procedure
		msg, _ := req.Any().(proto.Message)
		object, err := i.s.authorize(ctx, proc, msg)
		var resp connect.AnyResponse
		if err == nil {
			resp, err = next(ctx, req)
		}
		i.s.audit(ctx, proc, object, req.Peer().Addr, err)
		return resp, err
	}
}

func (authzInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (i authzInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		ctx = withAuditSlot(ctx)
		ac := &authzConn{StreamingHandlerConn: conn, s: i.s, ctx: ctx}
		err := next(ctx, ac)
		if ac.err != nil {
			err = ac.err
		}
		i.s.audit(ctx, conn.Spec().Procedure, ac.object, conn.Peer().Addr, err)
		return err
	}
}

// authzConn authorises a server stream's request when the handler receives
// it (Connect receives it before calling the handler's method).
type authzConn struct {
	connect.StreamingHandlerConn
	s       *Server
	ctx     context.Context
	checked bool
	object  string
	err     error
}

func (c *authzConn) Receive(m any) error {
	if err := c.StreamingHandlerConn.Receive(m); err != nil {
		return err
	}
	if c.checked {
		return nil
	}
	c.checked = true
	msg, _ := m.(proto.Message)
	c.object, c.err = c.s.authorize(c.ctx, c.Spec().Procedure, msg)
	return toConnect(c.err)
}

// Bounds of an audit record's object and detail (the error's message,
// which may quote a request's values): the trail keeps every call a member
// or a viewer makes, and a record must not grow with the request.
const (
	MaxAuditObject = 256
	MaxAuditDetail = 1024
)

// audit records a call that is not read-only in the caller's org.
func (s *Server) audit(ctx context.Context, procedure, object, peer string, callErr error) {
	if readOnly(procedure) || rules[procedure].quiet {
		return
	}
	p, ok := PrincipalFrom(ctx)
	if !ok {
		return
	}
	rec := store.AuditRecord{
		OrgID: p.OrgID, At: time.Now().UTC(), Actor: p.Subject, Via: p.KeyPrefix, Peer: peer,
		Action: strings.TrimPrefix(procedure, "/chalk.compute.v1."), Object: object, Outcome: "ok",
	}
	if p.IsWorkload() {
		rec.Via = "sandbox:" + p.SandboxID
	}
	if callErr != nil {
		var ce *connect.Error
		if errors.As(toConnect(callErr), &ce) {
			rec.Outcome, rec.Detail = ce.Code().String(), ce.Message()
		}
	}
	if o := auditObject(ctx); o != "" && rec.Object == "" {
		rec.Object = o
	}
	rec.Object, rec.Detail = reqlimit.Clip(rec.Object, MaxAuditObject), reqlimit.Clip(rec.Detail, MaxAuditDetail)
	if batchedAudit[procedure] {
		s.audits.add(ctx, rec)
		return
	}
	// The audit write must not be cancelled with the call it records.
	if err := s.store.AddAudit(context.WithoutCancel(ctx), rec); err != nil {
		s.log.Error("audit record", "action", rec.Action, "err", err)
	}
}

// auditObjectKey lets a handler name the object it created (e.g. the new
// sandbox's id) for the audit record.
type auditObjectKey struct{}

// auditSlot is per call: the object for the audit record, and the sandbox
// record the authorisation check read (the handler's first sandboxFor of
// that sandbox takes it instead of reading it again: one SQLite read less on
// every exec, profiled).
type auditSlot struct {
	object string
	sb     *store.Sandbox
}

// keepSandbox keeps the record authorisation read for the handler.
func keepSandbox(ctx context.Context, sb *store.Sandbox) {
	if a, ok := ctx.Value(auditObjectKey{}).(*auditSlot); ok {
		a.sb = sb
	}
}

// takeSandbox returns (once) the record of sandbox id that authorisation
// read in this call; a later sandboxFor (Wait's polling, say) reads the store.
func takeSandbox(ctx context.Context, id string) *store.Sandbox {
	a, ok := ctx.Value(auditObjectKey{}).(*auditSlot)
	if !ok || a.sb == nil || a.sb.ID != id {
		return nil
	}
	sb := a.sb
	a.sb = nil
	return sb
}

func withAuditSlot(ctx context.Context) context.Context {
	return context.WithValue(ctx, auditObjectKey{}, &auditSlot{})
}

// setAuditObject names the object a call created, for its audit record.
func setAuditObject(ctx context.Context, object string) {
	if a, ok := ctx.Value(auditObjectKey{}).(*auditSlot); ok {
		a.object = object
	}
}

func auditObject(ctx context.Context) string {
	if a, ok := ctx.Value(auditObjectKey{}).(*auditSlot); ok {
		return a.object
	}
	return ""
}
