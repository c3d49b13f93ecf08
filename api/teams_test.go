package api

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	v1 "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1"
	"github.com/chalkcompute/chalkcompute/store"
)

func code(err error) connect.Code {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce.Code()
	}
	return 0
}

func wantCode(t *testing.T, what string, err error, want connect.Code) {
	t.Helper()
	if code(err) != want {
		t.Fatalf("%s: %v, want %v", what, err, want)
	}
}

// TestKeyFormat: keys carry the fixed prefix and a checksum a scanner can
// verify; a changed character breaks it; the public prefix is not the secret.
func TestKeyFormat(t *testing.T) {
	secret, prefix, hash := NewKey()
	if !strings.HasPrefix(secret, "chalk_") || len(secret) != len("chalk_")+46 || !ValidKeyChecksum(secret) {
		t.Fatalf("key %q: bad format", secret)
	}
	if prefix != secret[:14] || hash != HashKey(secret) || strings.Contains(hash, secret) {
		t.Fatalf("prefix %q hash %q", prefix, hash)
	}
	flipped := []byte(secret)
	flipped[10] ^= 1
	if ValidKeyChecksum(string(flipped)) {
		t.Fatalf("checksum accepts a changed key %q", flipped)
	}
	if s2, _, _ := NewKey(); s2 == secret {
		t.Fatal("two keys alike")
	}
}

// TestRevokedKeyFailsNextCall: a revoked key is refused on the very next
// call, though it was just used (and so cached: no cache window on this
// chalkd); so is an expired one and one whose member was removed from the
// org, and a lowered role counts at once.
func TestRevokedKeyFailsNextCall(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	k, err := tn.user("mia").team.CreateKey(ctx, connect.NewRequest(&v1.CreateKeyRequest{Name: "ci"}))
	if err != nil {
		t.Fatal(err)
	}
	ci := tn.as(k.Msg.Secret)
	who, err := ci.identity.WhoAmI(ctx, connect.NewRequest(&v1.WhoAmIRequest{}))
	if err != nil || who.Msg.User != "mia" || who.Msg.OrgId != "a" || who.Msg.Role != "member" || who.Msg.KeyPrefix != k.Msg.Prefix {
		t.Fatalf("whoami with the new key: %+v %v", who.Msg, err)
	}
	if _, err := tn.user("alice").team.RevokeKey(ctx, connect.NewRequest(&v1.RevokeKeyRequest{Id: k.Msg.Prefix})); err != nil {
		t.Fatal(err)
	}
	_, err = ci.identity.WhoAmI(ctx, connect.NewRequest(&v1.WhoAmIRequest{}))
	wantCode(t, "the call after revocation", err, connect.CodeUnauthenticated)
	if !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("revoked key error does not say so: %v", err)
	}

	// Expiry: a key works before its time, not after.
	now := time.Now().UTC()
	for _, tc := range []struct {
		exp  time.Time
		want connect.Code
	}{{now.Add(time.Hour), 0}, {now.Add(-time.Second), connect.CodeUnauthenticated}} {
		k, secret := newAPIKey("a", "mia", "exp", store.RoleMember, "test", now.Add(-time.Hour), 0)
		k.ExpiresAt = tc.exp
		if err := tn.store.CreateKey(ctx, k); err != nil {
			t.Fatal(err)
		}
		_, err := tn.as(secret).identity.WhoAmI(ctx, connect.NewRequest(&v1.WhoAmIRequest{}))
		if code(err) != tc.want || (err != nil && !strings.Contains(err.Error(), "expired")) {
			t.Fatalf("key expiring at %v: %v, want %v", tc.exp, err, tc.want)
		}
	}

	// Lowering a member's role lowers what its keys may do at once.
	if who, err := tn.user("mia").identity.WhoAmI(ctx, connect.NewRequest(&v1.WhoAmIRequest{})); err != nil || who.Msg.Role != "member" {
		t.Fatalf("whoami before the role change: %+v %v", who, err)
	}
	if _, err := tn.user("alice").team.SetMemberRole(ctx, connect.NewRequest(&v1.SetMemberRoleRequest{User: "mia", Role: "viewer"})); err != nil {
		t.Fatal(err)
	}
	_, err = tn.user("mia").sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"}))
	wantCode(t, "a create by a member just made viewer", err, connect.CodePermissionDenied)

	// Removing the member ends every key it has in the org at once.
	if _, err := tn.user("alice").team.RemoveMember(ctx, connect.NewRequest(&v1.RemoveMemberRequest{User: "mia"})); err != nil {
		t.Fatal(err)
	}
	_, err = tn.user("mia").identity.WhoAmI(ctx, connect.NewRequest(&v1.WhoAmIRequest{}))
	wantCode(t, "a removed member's key", err, connect.CodeUnauthenticated)
}

// TestTeamBadInput: each refusal is a clear error and writes nothing.
func TestTeamBadInput(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	alice, bob, mia := tn.user("alice").team, tn.user("bob").team, tn.user("mia").team
	orgs := func() int {
		l, err := alice.ListOrgs(ctx, connect.NewRequest(&v1.ListOrgsRequest{}))
		if err != nil {
			t.Fatal(err)
		}
		return len(l.Msg.Orgs)
	}
	n := orgs()
	_, err := alice.CreateOrg(ctx, connect.NewRequest(&v1.CreateOrgRequest{Name: "b", Admin: "zed"}))
	wantCode(t, "duplicate org", err, connect.CodeAlreadyExists)
	_, err = alice.CreateOrg(ctx, connect.NewRequest(&v1.CreateOrgRequest{Name: "Bad_Name", Admin: "zed"}))
	wantCode(t, "bad org name", err, connect.CodeInvalidArgument)
	_, err = bob.CreateOrg(ctx, connect.NewRequest(&v1.CreateOrgRequest{Name: "c", Admin: "bob"}))
	wantCode(t, "org create by an org admin (not the node admin)", err, connect.CodePermissionDenied)
	if orgs() != n {
		t.Fatal("a refused org create left an org")
	}
	if m, err := tn.store.ListMembers(ctx, "b"); err != nil || len(m) != 1 {
		t.Fatalf("a refused org create touched b's members: %v %v", m, err)
	}

	_, err = alice.AddMember(ctx, connect.NewRequest(&v1.AddMemberRequest{User: "mia", Role: "viewer"}))
	wantCode(t, "duplicate member", err, connect.CodeAlreadyExists)
	_, err = alice.AddMember(ctx, connect.NewRequest(&v1.AddMemberRequest{User: "zed", Role: "owner"}))
	wantCode(t, "unknown role", err, connect.CodeInvalidArgument)
	_, err = bob.RemoveMember(ctx, connect.NewRequest(&v1.RemoveMemberRequest{User: "bob"}))
	wantCode(t, "removing the last admin", err, connect.CodeFailedPrecondition)
	_, err = bob.SetMemberRole(ctx, connect.NewRequest(&v1.SetMemberRoleRequest{User: "bob", Role: "member"}))
	wantCode(t, "demoting the last admin", err, connect.CodeFailedPrecondition)
	if !strings.Contains(err.Error(), "last admin") {
		t.Fatalf("last admin error: %v", err)
	}

	keys := func() int {
		l, err := alice.ListKeys(ctx, connect.NewRequest(&v1.ListKeysRequest{All: true}))
		if err != nil {
			t.Fatal(err)
		}
		return len(l.Msg.Keys)
	}
	k := keys()
	_, err = mia.CreateKey(ctx, connect.NewRequest(&v1.CreateKeyRequest{Name: "up", Role: "admin"}))
	wantCode(t, "a member's key making an admin key", err, connect.CodePermissionDenied)
	// An admin user's viewer-scoped key cannot make a member key either.
	vk, err := alice.CreateKey(ctx, connect.NewRequest(&v1.CreateKeyRequest{Name: "ro", Role: "viewer"}))
	if err != nil {
		t.Fatal(err)
	}
	_, err = tn.as(vk.Msg.Secret).team.CreateKey(ctx, connect.NewRequest(&v1.CreateKeyRequest{Name: "up", Role: "member"}))
	wantCode(t, "a viewer-scoped key making a key", err, connect.CodePermissionDenied)
	_, err = mia.CreateKey(ctx, connect.NewRequest(&v1.CreateKeyRequest{Name: "for-vic", User: "vic"}))
	wantCode(t, "a member making a key for someone else", err, connect.CodePermissionDenied)
	_, err = alice.CreateKey(ctx, connect.NewRequest(&v1.CreateKeyRequest{Name: "x", User: "vic", Role: "member"}))
	wantCode(t, "a key above its user's role", err, connect.CodeInvalidArgument)
	_, err = mia.CreateKey(ctx, connect.NewRequest(&v1.CreateKeyRequest{Name: ""}))
	wantCode(t, "a key without a name", err, connect.CodeInvalidArgument)
	if keys() != k+1 { // only the viewer key
		t.Fatalf("refused key creates left keys: %d, want %d", keys(), k+1)
	}
	_, err = mia.RevokeKey(ctx, connect.NewRequest(&v1.RevokeKeyRequest{Id: vk.Msg.Id}))
	wantCode(t, "a member revoking another user's key", err, connect.CodePermissionDenied)
}

// TestOrgLifecycle: the node admin makes an org and its first admin (with
// a key shown once), who adds a member whose key works in that org only.
func TestOrgLifecycle(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{DefaultQuota: store.Quota{MaxRunning: 7}})
	res, err := tn.user("alice").team.CreateOrg(ctx, connect.NewRequest(&v1.CreateOrgRequest{Name: "c", Admin: "carol"}))
	if err != nil {
		t.Fatal(err)
	}
	if res.Msg.AdminKey.GetSecret() == "" || res.Msg.Org.Quota.MaxRunningSandboxes != 7 {
		t.Fatalf("create org: %+v", res.Msg)
	}
	carol := tn.as(res.Msg.AdminKey.Secret)
	m, err := carol.team.AddMember(ctx, connect.NewRequest(&v1.AddMemberRequest{User: "dan", Role: "member"}))
	if err != nil {
		t.Fatal(err)
	}
	dan := tn.as(m.Msg.Key.Secret)
	who, err := dan.identity.WhoAmI(ctx, connect.NewRequest(&v1.WhoAmIRequest{}))
	if err != nil || who.Msg.OrgId != "c" || who.Msg.Role != "member" || who.Msg.NodeAdmin {
		t.Fatalf("whoami: %+v %v", who.Msg, err)
	}
	ms, err := carol.team.ListMembers(ctx, connect.NewRequest(&v1.ListMembersRequest{}))
	if err != nil || len(ms.Msg.Members) != 2 {
		t.Fatalf("members: %+v %v", ms.Msg, err)
	}
	// Listed keys never carry the secret; list shows creator and prefix.
	ks, err := carol.team.ListKeys(ctx, connect.NewRequest(&v1.ListKeysRequest{All: true}))
	if err != nil || len(ks.Msg.Keys) != 2 {
		t.Fatalf("keys: %v %v", ks, err)
	}
	for _, k := range ks.Msg.Keys {
		if k.Secret != "" || k.Prefix == "" || k.CreatedBy == "" {
			t.Fatalf("listed key: %+v", k)
		}
	}
	// A user in two orgs: dan joins org b too, with a key there; each key
	// acts in its own org with that org's role.
	inB, err := tn.user("bob").team.AddMember(ctx, connect.NewRequest(&v1.AddMemberRequest{User: "dan", Role: "viewer"}))
	if err != nil {
		t.Fatal(err)
	}
	whoB, err := tn.as(inB.Msg.Key.Secret).identity.WhoAmI(ctx, connect.NewRequest(&v1.WhoAmIRequest{}))
	if err != nil || whoB.Msg.OrgId != "b" || whoB.Msg.Role != "viewer" || whoB.Msg.User != "dan" {
		t.Fatalf("dan's key in org b: %+v %v", whoB.Msg, err)
	}
	if who, err := dan.identity.WhoAmI(ctx, connect.NewRequest(&v1.WhoAmIRequest{})); err != nil || who.Msg.OrgId != "c" || who.Msg.Role != "member" {
		t.Fatalf("dan's key in org c after joining b: %+v %v", who.Msg, err)
	}
	// The node admin sets c's quota; carol cannot.
	_, err = carol.team.SetQuota(ctx, connect.NewRequest(&v1.SetQuotaRequest{Quota: &v1.Quota{MaxRunningSandboxes: 100}}))
	wantCode(t, "an org admin setting its quota", err, connect.CodePermissionDenied)
	q, err := tn.user("alice").team.SetQuota(ctx, connect.NewRequest(&v1.SetQuotaRequest{Org: "c", Quota: &v1.Quota{MaxVcpu: 2}}))
	if err != nil || q.Msg.MaxVcpu != 2 || q.Msg.MaxRunningSandboxes != 7 {
		t.Fatalf("set quota: %+v %v", q, err)
	}
}

// TestQuotaAtCreate: through the API, a quota of n admits n and refuses
// the next with resource_exhausted naming the limit; 20 creates racing a
// quota of 10 give exactly 10 sandboxes.
func TestQuotaAtCreate(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	if err := tn.store.SetQuota(ctx, "a", store.Quota{MaxRunning: 10, MaxVCPU: 3}); err != nil {
		t.Fatal(err)
	}
	mia := tn.user("mia").sandbox
	// A sandbox without a cpu limit is given (and charged) 1 vCPU under a vCPU quota.
	for i := 0; i < 3; i++ {
		sb, err := mia.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"}))
		if err != nil || sb.Msg.Cpu != 1 {
			t.Fatalf("create %d: %+v %v", i, sb, err)
		}
	}
	_, err := mia.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox", Cpu: 0.5}))
	wantCode(t, "one over max_vcpu", err, connect.CodeResourceExhausted)
	if !strings.Contains(err.Error(), "max_vcpu") {
		t.Fatalf("quota error does not name the limit: %v", err)
	}
	// Org b is not limited by a's quota.
	if _, err := tn.user("bob").sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox", Cpu: 4})); err != nil {
		t.Fatalf("org b: %v", err)
	}
	// End a's sandboxes, lift the vCPU limit, and race 20 creates at 10.
	l, _ := mia.List(ctx, connect.NewRequest(&v1.ListSandboxesRequest{}))
	for _, sb := range l.Msg.Sandboxes {
		if _, err := mia.Terminate(ctx, connect.NewRequest(&v1.TerminateSandboxRequest{Id: sb.Id})); err != nil {
			t.Fatal(err)
		}
	}
	if err := tn.store.SetQuota(ctx, "a", store.Quota{MaxRunning: 10}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	codes := map[connect.Code]int{}
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := mia.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"}))
			mu.Lock()
			codes[code(err)]++
			mu.Unlock()
			if err != nil && !strings.Contains(err.Error(), "max_running_sandboxes 10") {
				t.Errorf("refusal does not name the limit: %v", err)
			}
		}()
	}
	wg.Wait()
	if codes[0] != 10 || codes[connect.CodeResourceExhausted] != 10 {
		t.Fatalf("20 creates racing a quota of 10: %v", codes)
	}
	l, _ = mia.List(ctx, connect.NewRequest(&v1.ListSandboxesRequest{}))
	if len(l.Msg.Sandboxes) != 10 {
		t.Fatalf("%d sandboxes live, want 10", len(l.Msg.Sandboxes))
	}
}

// TestAuditTrail: mutating calls, allowed and refused, are recorded in the
// caller's org with who, how and the outcome; reads are not; another org
// sees none of them; only admins read the trail.
func TestAuditTrail(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	sb, err := tn.user("mia").sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "busybox"}))
	if err != nil {
		t.Fatal(err)
	}
	_, err = tn.user("vic").sandbox.Terminate(ctx, connect.NewRequest(&v1.TerminateSandboxRequest{Id: sb.Msg.Id}))
	wantCode(t, "viewer terminates", err, connect.CodePermissionDenied)
	if _, err := tn.user("mia").sandbox.Get(ctx, connect.NewRequest(&v1.GetSandboxRequest{Id: sb.Msg.Id})); err != nil {
		t.Fatal(err)
	}
	res, err := tn.user("alice").team.Audit(ctx, connect.NewRequest(&v1.AuditRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	recs := res.Msg.Records
	if len(recs) != 2 {
		t.Fatalf("audit: %d records, want 2 (create, refused terminate): %+v", len(recs), recs)
	}
	term, create := recs[0], recs[1]
	if create.Action != "SandboxService/Create" || create.Object != sb.Msg.Id || create.Outcome != "ok" ||
		create.Actor != UserSubject("a", "mia") || !strings.HasPrefix(create.Via, "chalk_") || create.Peer == "" {
		t.Fatalf("create record: %+v", create)
	}
	if term.Action != "SandboxService/Terminate" || term.Object != sb.Msg.Id || term.Outcome != "permission_denied" || term.Actor != UserSubject("a", "vic") {
		t.Fatalf("refused terminate record: %+v", term)
	}
	// Pre-started pools are the node's: an org admin may not size them.
	n := int32(1)
	st, err := tn.user("bob").image.Warm(ctx, connect.NewRequest(&v1.WarmImageRequest{Image: "busybox", Sandboxes: &n}))
	if err == nil {
		for st.Receive() {
		}
		err = st.Err()
	}
	wantCode(t, "an org admin sizing a pre-started pool", err, connect.CodePermissionDenied)
	if b, err := tn.user("bob").team.Audit(ctx, connect.NewRequest(&v1.AuditRequest{})); err != nil || len(b.Msg.Records) != 1 || b.Msg.Records[0].Outcome != "permission_denied" {
		t.Fatalf("org b's audit: %+v %v", b, err)
	}
	_, err = tn.user("mia").team.Audit(ctx, connect.NewRequest(&v1.AuditRequest{}))
	wantCode(t, "a member reads the audit trail", err, connect.CodePermissionDenied)
	if sb.Msg.CreatedBy != UserSubject("a", "mia") {
		t.Fatalf("created_by %q", sb.Msg.CreatedBy)
	}
}

// TestImageViews: an image built by org a is listed, inspected, warmed and
// removed by a only; a node-seeded image is visible to every org and only
// the node admin removes it; the same content built by both orgs stays in
// one's view when the other removes it.
func TestImageViews(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	tn.images.images["busybox:latest"] = &v1.Image{Ref: "busybox:latest", Digest: "sha256:base"}
	tn.images.images["built-a"] = &v1.Image{Ref: "built-a", Digest: "sha256:dig-a"}
	tn.images.hashes["sha256:hash-a"] = "built-a"
	tn.node.digests["built-a"] = "sha256:dig-a"
	tn.node.digests["other-name-for-a"] = "sha256:dig-a"
	if err := tn.store.AddOrgImages(ctx, "a", "sha256:hash-a", "sha256:dig-a", "built-a"); err != nil {
		t.Fatal(err)
	}
	list := func(user string) []string {
		l, err := tn.user(user).image.List(ctx, connect.NewRequest(&v1.ListImagesRequest{}))
		if err != nil {
			t.Fatal(err)
		}
		var refs []string
		for _, i := range l.Msg.Images {
			refs = append(refs, i.Ref)
		}
		return refs
	}
	if got := list("bob"); len(got) != 1 || got[0] != "busybox:latest" {
		t.Fatalf("org b lists %v, want only the seeded image", got)
	}
	if got := list("vic"); len(got) != 2 {
		t.Fatalf("org a lists %v, want both", got)
	}
	bob := tn.user("bob")
	_, err := bob.image.Inspect(ctx, connect.NewRequest(&v1.InspectImageRequest{Ref: "built-a"}))
	wantCode(t, "b inspects a's image", err, connect.CodeNotFound)
	_, err = bob.sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "sha256:hash-a"}))
	wantCode(t, "b creates from a's image hash", err, connect.CodeNotFound)
	_, err = bob.sandbox.Create(ctx, connect.NewRequest(&v1.CreateSandboxRequest{Image: "other-name-for-a"}))
	wantCode(t, "b creates from a's image by another name", err, connect.CodeNotFound)
	st, err := bob.image.Warm(ctx, connect.NewRequest(&v1.WarmImageRequest{Image: "other-name-for-a"}))
	if err == nil {
		for st.Receive() {
		}
		err = st.Err()
	}
	wantCode(t, "b warms a's image by another name", err, connect.CodeNotFound)
	if _, err := bob.image.Inspect(ctx, connect.NewRequest(&v1.InspectImageRequest{Ref: "busybox:latest"})); err != nil {
		t.Fatalf("b inspects the seeded image: %v", err)
	}
	_, err = bob.image.Remove(ctx, connect.NewRequest(&v1.RemoveImageRequest{Ref: "busybox:latest"}))
	wantCode(t, "an org admin removes the seeded image", err, connect.CodePermissionDenied)
	// b built the same content: a's removal keeps it in b's view.
	if err := tn.store.AddOrgImages(ctx, "b", "sha256:dig-a", "built-a"); err != nil {
		t.Fatal(err)
	}
	if _, err := tn.user("mia").image.Remove(ctx, connect.NewRequest(&v1.RemoveImageRequest{Ref: "built-a"})); err != nil {
		t.Fatal(err)
	}
	if got := list("vic"); len(got) != 1 {
		t.Fatalf("org a after removal lists %v", got)
	}
	if got := list("bob"); len(got) != 2 {
		t.Fatalf("org b after a's removal lists %v, want its copy kept", got)
	}
}

// TestKeyCache: a verified key is answered from memory; a change made
// through the store by any path (not only the API) drops it at once; a
// change made by another process on the same database counts within
// keyCacheTTL; a cached key still expires on time.
func TestKeyCache(t *testing.T) {
	ctx := context.Background()
	tn := newTestNode(t, Config{})
	a := tn.srv.auth
	now := time.Now()
	a.now = func() time.Time { return now }
	whoami := func(secret string) error {
		_, err := tn.as(secret).identity.WhoAmI(ctx, connect.NewRequest(&v1.WhoAmIRequest{}))
		return err
	}
	cached := func(secret string) bool {
		a.keys.mu.Lock()
		defer a.keys.mu.Unlock()
		return a.keys.m[HashKey(secret)] != nil
	}
	k, secret := newAPIKey("a", "mia", "cache", store.RoleMember, "test", now, 0)
	k.ExpiresAt = now.Add(time.Second)
	if err := tn.store.CreateKey(ctx, k); err != nil {
		t.Fatal(err)
	}
	if err := whoami(secret); err != nil {
		t.Fatal(err)
	}
	if !cached(secret) {
		t.Fatal("a verified key is not cached")
	}
	// Expiry is checked on a cache hit.
	now = now.Add(1500 * time.Millisecond)
	if err := whoami(secret); code(err) != connect.CodeUnauthenticated || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("a cached key past its expiry: %v", err)
	}

	// A revocation through the store itself (no API call) drops the cache.
	k2, secret2 := newAPIKey("a", "mia", "cache2", store.RoleMember, "test", now, 0)
	if err := tn.store.CreateKey(ctx, k2); err != nil {
		t.Fatal(err)
	}
	if err := whoami(secret2); err != nil || !cached(secret2) {
		t.Fatalf("second key: %v, cached %v", err, cached(secret2))
	}
	if err := tn.store.RevokeKey(ctx, "a", k2.ID, now); err != nil {
		t.Fatal(err)
	}
	if err := whoami(secret2); code(err) != connect.CodeUnauthenticated {
		t.Fatalf("a key revoked in the store, cached before: %v", err)
	}

	// Another process on the same database: its revocation counts here
	// once the cached answer is keyCacheTTL old.
	k3, secret3 := newAPIKey("a", "mia", "cache3", store.RoleMember, "test", now, 0)
	if err := tn.store.CreateKey(ctx, k3); err != nil {
		t.Fatal(err)
	}
	if err := whoami(secret3); err != nil {
		t.Fatal(err)
	}
	other, err := store.Open(ctx, tn.dbPath)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := other.RevokeKey(ctx, "a", k3.ID, now); err != nil {
		t.Fatal(err)
	}
	now = now.Add(keyCacheTTL)
	if err := whoami(secret3); code(err) != connect.CodeUnauthenticated {
		t.Fatalf("a key revoked by another process, keyCacheTTL later: %v", err)
	}

	// Unknown keys are not cached (nothing an unauthenticated caller sends
	// fills the cache).
	if err := whoami(KeyPrefix + "nope"); code(err) != connect.CodeUnauthenticated || cached(KeyPrefix+"nope") {
		t.Fatalf("unknown key: %v, cached %v", err, cached(KeyPrefix+"nope"))
	}
}
