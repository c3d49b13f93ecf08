package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"math/bits"
	"strings"
	"sync"
	"time"
)

// MCPServer is an upstream MCP server registered with the gateway.
// Credential is sealed (encrypted with the node's gateway key): the store
// never holds it in the clear, and no API returns it.
type MCPServer struct {
	OrgID      string `json:"org_id"`
	Name       string `json:"name"`
	URL        string `json:"url"`
	HeaderName string `json:"header_name"` // the header the credential goes in (Authorization: "Bearer <credential>")
	Credential []byte `json:"credential"`  // sealed
	// Allowlists: nil allows everything; an empty list nothing.
	AllowedTools     []string          `json:"allowed_tools"`
	AllowedResources []string          `json:"allowed_resources"`
	AllowedPrompts   []string          `json:"allowed_prompts"`
	SandboxLabels    map[string]string `json:"sandbox_labels"` // sandboxes that may use it: all these labels (none: every sandbox)
	RatePerSecond    float64           `json:"rate_per_second"`
	CreatedAt        time.Time         `json:"created_at"`
	CreatedBy        string            `json:"created_by"`
}

// PutMCPServer creates or replaces a server.
func (s *Store) PutMCPServer(ctx context.Context, m *MCPServer) error {
	doc, err := json.Marshal(m)
	if err != nil {
		return err
	}
	_, err = s.db.ExecContext(ctx, `INSERT INTO mcp_servers (org_id, name, doc) VALUES (?, ?, ?)
		ON CONFLICT (org_id, name) DO UPDATE SET doc = excluded.doc`, m.OrgID, m.Name, doc)
	return err
}

// GetMCPServer returns one server.
func (s *Store) GetMCPServer(ctx context.Context, orgID, name string) (*MCPServer, error) {
	return getNamed[MCPServer](ctx, s.db, "mcp_servers", "MCP server", orgID, name)
}

// ListMCPServers returns the org's servers by name.
func (s *Store) ListMCPServers(ctx context.Context, orgID string) ([]*MCPServer, error) {
	return listNamed[MCPServer](ctx, s.db, "mcp_servers", orgID)
}

// DeleteMCPServer removes a server.
func (s *Store) DeleteMCPServer(ctx context.Context, orgID, name string) error {
	return deleteNamed(ctx, s.db, "mcp_servers", "MCP server", orgID, name)
}

// MCPAudit is one call through the gateway (one JSON-RPC message, or one
// HTTP request refused before its body was read).
type MCPAudit struct {
	Seq        int64     `json:"seq"`
	At         time.Time `json:"at"`
	OrgID      string    `json:"org_id"`
	SandboxID  string    `json:"sandbox_id"`
	Subject    string    `json:"sub"`
	Server     string    `json:"server"`
	HTTPMethod string    `json:"http_method"`
	Method     string    `json:"method"` // JSON-RPC method
	Tool       string    `json:"tool"`   // tool, prompt or resource URI named by the call
	ArgsSHA256 string    `json:"args_sha256"`
	Decision   string    `json:"decision"` // "allowed" or "denied: <reason>"
	Status     int       `json:"status"`   // HTTP status returned to the sandbox
	LatencyMS  float64   `json:"latency_ms"`
	BytesIn    int64     `json:"bytes_in"`
	BytesOut   int64     `json:"bytes_out"`
}

// AddMCPAudit appends records in one transaction.
func (s *Store) AddMCPAudit(ctx context.Context, recs []MCPAudit) error {
	// Rows go in chunks of auditRowsPerInsert and then of the powers of two
	// below it (a batch of 100: 64, 32, 4), in the records' order, each
	// chunk through the INSERT of its size prepared once per store: the
	// gateway's writer stores every 50 ms whatever came, so a batch's rest
	// was a new INSERT to parse each time (with the 64-row one prepared per
	// batch, about 40 % of the writer's CPU). The statements are prepared
	// before the transaction takes the connection (SQLite has one).
	qs := auditQueries(s.db.d)
	var stmts [auditSizes]*sql.Stmt
	for rest := len(recs); rest > 0; {
		n := auditChunk(rest)
		stmts[auditSize(n)] = s.db.prepared(ctx, qs[auditSize(n)])
		rest -= n
	}
	tx, err := s.db.BeginTx(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	args := make([]any, 0, 5*auditRowsPerInsert)
	for len(recs) > 0 {
		n := auditChunk(len(recs))
		args = args[:0]
		for i := range recs[:n] {
			doc, err := json.Marshal(&recs[i])
			if err != nil {
				return err
			}
			// The sandbox names the server: stored as valid UTF-8 without
			// NUL (PostgreSQL would refuse it, and with it the whole batch).
			args = append(args, text(recs[i].OrgID), recs[i].At.UnixNano(), text(recs[i].SandboxID), text(recs[i].Server), doc)
		}
		if st := stmts[auditSize(n)]; st != nil {
			_, err = tx.tx.StmtContext(ctx, st).ExecContext(ctx, args...)
			err = tx.d.classify(err)
		} else {
			_, err = tx.ExecContext(ctx, auditInsert(n), args...)
		}
		if err != nil {
			return err
		}
		recs = recs[n:]
	}
	return tx.Commit()
}

// auditRowsPerInsert is how many audit records one INSERT stores at most
// (5 parameters each: well within SQLite's 999 and PostgreSQL's 65535); a
// power of two.
const auditRowsPerInsert = 64

// auditSizes is the number of INSERT sizes: 1, 2, 4, ... auditRowsPerInsert.
const auditSizes = 7

// auditChunk is the size of the next INSERT for rest records: the largest
// power of two not above rest, at most auditRowsPerInsert.
func auditChunk(rest int) int {
	if rest >= auditRowsPerInsert {
		return auditRowsPerInsert
	}
	return 1 << (bits.Len(uint(rest)) - 1)
}

// auditSize indexes a chunk size (a power of two) in [auditSizes].
func auditSize(n int) int { return bits.Len(uint(n)) - 1 }

// auditQueryCache holds, per dialect, the audit INSERT of each size as the
// dialect writes it (built once, not per batch).
var auditQueryCache sync.Map // *dialect -> *[auditSizes]string

func auditQueries(d *dialect) *[auditSizes]string {
	if qs, ok := auditQueryCache.Load(d); ok {
		return qs.(*[auditSizes]string)
	}
	var qs [auditSizes]string
	for i := range qs {
		qs[i] = d.rebind(auditInsert(1 << i))
	}
	got, _ := auditQueryCache.LoadOrStore(d, &qs)
	return got.(*[auditSizes]string)
}

// auditInsert is the INSERT of n audit records (rows in order: seq follows
// the records' order).
func auditInsert(n int) string {
	var b strings.Builder
	b.WriteString(`INSERT INTO mcp_audit (org_id, at, sandbox_id, server, doc) VALUES `)
	for i := range n {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString("(?, ?, ?, ?, ?)")
	}
	return b.String()
}

// PruneMCPAudit removes the records older than before (in chunks, so the
// writer lock is held briefly) and returns how many.
func (s *Store) PruneMCPAudit(ctx context.Context, before time.Time) (int64, error) {
	return s.deleteInBatches(ctx, `DELETE FROM mcp_audit WHERE seq IN (SELECT seq FROM mcp_audit WHERE at < ? LIMIT ?)`, 5000, before.UnixNano())
}

// MCPAuditQuery selects audit records: newest first, at most Limit.
type MCPAuditQuery struct {
	OrgID, SandboxID, Server string
	Since                    time.Time
	Limit                    int
}

// ListMCPAudit returns the records q selects, newest first.
func (s *Store) ListMCPAudit(ctx context.Context, q MCPAuditQuery) ([]MCPAudit, error) {
	if q.Limit <= 0 || q.Limit > 10000 {
		q.Limit = 100
	}
	sqlq := `SELECT seq, doc FROM mcp_audit WHERE org_id = ?`
	args := []any{q.OrgID}
	if q.SandboxID != "" {
		sqlq += ` AND sandbox_id = ?`
		args = append(args, q.SandboxID)
	}
	if q.Server != "" {
		sqlq += ` AND server = ?`
		args = append(args, q.Server)
	}
	if !q.Since.IsZero() {
		sqlq += ` AND at >= ?`
		args = append(args, q.Since.UnixNano())
	}
	sqlq += ` ORDER BY seq DESC LIMIT ?`
	args = append(args, q.Limit)
	rows, err := s.db.QueryContext(ctx, sqlq, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []MCPAudit
	for rows.Next() {
		var seq int64
		var doc []byte
		if err := rows.Scan(&seq, &doc); err != nil {
			return nil, err
		}
		var r MCPAudit
		if err := json.Unmarshal(doc, &r); err != nil {
			return nil, err
		}
		r.Seq = seq
		out = append(out, r)
	}
	return out, rows.Err()
}
