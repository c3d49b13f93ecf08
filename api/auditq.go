package api

import (
	"context"
	"log/slog"
	"sync"
	"time"

	c "github.com/chalkcompute/chalkcompute/gen/chalk/compute/v1/computev1connect"
	"github.com/chalkcompute/chalkcompute/store"
)

// batchedAudit lists the procedures whose audit records are stored in
// batches by the audit writer instead of before the call answers: calls made
// many times a second, where one INSERT per call was a tenth of the call's
// time and held the store's connection between calls. Every other audited
// call stores its record before it answers.
var batchedAudit = map[string]bool{
	c.SandboxServiceExecProcedure: true,
}

// auditBatchDelay is how long the writer gathers records after the first
// before storing them, auditBatchMax the most it stores in one transaction,
// and auditQueueLen the records it holds before callers store their own.
const (
	auditBatchDelay = 20 * time.Millisecond
	auditBatchMax   = 256
	auditQueueLen   = 4096
)

// auditWriter stores queued audit records in batches, one transaction each.
// No record is dropped: a full queue (the writer behind) or a closed writer
// makes add store the record itself, as an unbatched call does; Flush (the
// Audit call, before it reads) and Close store everything queued so far. A
// record is stored at most auditBatchDelay (plus the write) after its call
// answered, so what a crash of chalkd loses is the records of that window —
// the synchronous write had the same window between a call's end and its
// INSERT, only shorter.
type auditWriter struct {
	st    *store.Store
	log   *slog.Logger
	delay time.Duration

	q        chan store.AuditRecord
	flushReq chan chan struct{}
	stop     chan struct{}
	done     chan struct{}

	// mu orders add against Close: once closed is set under mu, nothing is
	// sent to q any more, so the writer's last drain sees every record.
	mu     sync.RWMutex
	closed bool
}

func newAuditWriter(st *store.Store, log *slog.Logger, delay time.Duration) *auditWriter {
	w := &auditWriter{
		st: st, log: log, delay: delay,
		q:        make(chan store.AuditRecord, auditQueueLen),
		flushReq: make(chan chan struct{}),
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
	}
	go w.run()
	return w
}

// add queues rec, or stores it now when the queue is full or the writer
// closed.
func (w *auditWriter) add(ctx context.Context, rec store.AuditRecord) {
	w.mu.RLock()
	if !w.closed {
		select {
		case w.q <- rec:
			w.mu.RUnlock()
			return
		default:
		}
	}
	w.mu.RUnlock()
	w.store(ctx, []store.AuditRecord{rec})
}

// store writes recs in one transaction; if that fails, one by one, so one
// record the store refuses does not lose the others. Failures are logged
// with the record's action, as the synchronous write logs them.
func (w *auditWriter) store(ctx context.Context, recs []store.AuditRecord) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	err := w.st.AddAudits(ctx, recs)
	if err == nil {
		return
	}
	if len(recs) == 1 {
		w.log.Error("audit record", "action", recs[0].Action, "err", err)
		return
	}
	for _, r := range recs {
		if err := w.st.AddAudit(ctx, r); err != nil {
			w.log.Error("audit record", "action", r.Action, "err", err)
		}
	}
}

func (w *auditWriter) run() {
	defer close(w.done)
	var batch []store.AuditRecord
	flush := func() {
		if len(batch) > 0 {
			w.store(context.Background(), batch)
			batch = batch[:0]
		}
	}
	// drain takes everything queued now.
	drain := func() {
		for {
			select {
			case r := <-w.q:
				batch = append(batch, r)
				if len(batch) >= auditBatchMax {
					flush()
				}
			default:
				return
			}
		}
	}
	for {
		select {
		case r := <-w.q:
			batch = append(batch, r)
			ack, stopped := w.gather(&batch)
			if ack != nil || stopped {
				drain()
			}
			flush()
			if ack != nil {
				close(ack)
			}
			if stopped {
				return
			}
		case ack := <-w.flushReq:
			drain()
			flush()
			close(ack)
		case <-w.stop:
			drain()
			flush()
			return
		}
	}
}

// gather adds queued records to batch until the delay passes, the batch is
// full, a flush is asked for (returned: answered once the batch is stored)
// or the writer stops.
func (w *auditWriter) gather(batch *[]store.AuditRecord) (ack chan struct{}, stopped bool) {
	t := time.NewTimer(w.delay)
	defer t.Stop()
	for len(*batch) < auditBatchMax {
		select {
		case r := <-w.q:
			*batch = append(*batch, r)
		case <-t.C:
			return nil, false
		case ack := <-w.flushReq:
			return ack, false
		case <-w.stop:
			return nil, true
		}
	}
	return nil, false
}

// Flush returns once every record queued before the call is stored (or ctx
// ends).
func (w *auditWriter) Flush(ctx context.Context) {
	ack := make(chan struct{})
	select {
	case w.flushReq <- ack:
	case <-w.done:
		return
	case <-ctx.Done():
		return
	}
	select {
	case <-ack:
	case <-ctx.Done():
	}
}

// Close stores what is queued and stops the writer; later records are
// stored by their callers.
func (w *auditWriter) Close() {
	w.mu.Lock()
	already := w.closed
	w.closed = true
	w.mu.Unlock()
	if !already {
		close(w.stop)
	}
	<-w.done
}
