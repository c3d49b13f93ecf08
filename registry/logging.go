package registry

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"
)

// distribution logs through logrus' standard logger (its dcontext package is
// internal, so there is no per-App logger to inject). We silence that logger
// once per process and forward its entries to the *slog.Logger of the
// Registry that produced them. Each Registry gives its App a context whose
// "instance.id" value is the registry's own id; distribution copies that value
// into the fields of every entry it logs, which is how an entry finds its way
// back to the right slog.Logger. Entries from other logrus users in the
// process (there are none in chalkd today) are dropped.

const instanceIDKey = "instance.id"

var (
	hookOnce sync.Once
	loggers  sync.Map // instance id (string) -> *slog.Logger
)

func installLogrusHook() {
	hookOnce.Do(func() {
		std := logrus.StandardLogger()
		std.SetOutput(io.Discard)
		std.SetLevel(logrus.InfoLevel)
		std.AddHook(slogHook{})
	})
}

func registerLogger(id string, l *slog.Logger) { loggers.Store(id, l) }
func unregisterLogger(id string)               { loggers.Delete(id) }

// slogHook forwards logrus entries to slog.
type slogHook struct{}

func (slogHook) Levels() []logrus.Level { return logrus.AllLevels }

func (slogHook) Fire(e *logrus.Entry) error {
	id, _ := e.Data[instanceIDKey].(string)
	v, ok := loggers.Load(id)
	if !ok {
		return nil
	}
	l := v.(*slog.Logger)
	// distribution is chatty at info (one line per request); that is debug for us.
	level := slog.LevelDebug
	switch {
	case e.Level <= logrus.ErrorLevel:
		level = slog.LevelError
	case e.Level == logrus.WarnLevel:
		level = slog.LevelWarn
	}
	if level > slog.LevelDebug && expected(e) {
		level = slog.LevelDebug
	}
	ctx := context.Background()
	if !l.Enabled(ctx, level) {
		return nil
	}
	attrs := make([]slog.Attr, 0, len(e.Data))
	for k, val := range e.Data {
		if k == instanceIDKey || k == "go.version" {
			continue
		}
		if err, isErr := val.(error); isErr {
			val = err.Error()
		}
		attrs = append(attrs, slog.String(k, fmt.Sprint(val)))
	}
	l.LogAttrs(ctx, level, e.Message, attrs...)
	return nil
}

// expected reports whether e, logged by distribution as an error or a
// warning, is part of normal operation: a 404 answer to a read (every
// Resolve, build cache lookup and push probes for what is missing), the
// start-up warning about the index validation chalkd turns off on purpose
// (ociHandler does it; see distributionConfig), and the warning on every
// read of a blob by sha512 (stored under its sha256).
func expected(e *logrus.Entry) bool {
	if strings.HasPrefix(e.Message, "Image index completeness validation has been disabled") ||
		strings.HasPrefix(e.Message, "looking up blob with canonical target") {
		return true
	}
	method := fmt.Sprint(e.Data["http.request.method"])
	return fmt.Sprint(e.Data["http.response.status"]) == "404" && (method == "GET" || method == "HEAD")
}

// instanceContext answers distribution's "instance.id" lookups with our id,
// so that log entries can be routed back to this Registry's logger.
type instanceContext struct {
	context.Context
	id string
}

func (c instanceContext) Value(key any) any {
	if k, ok := key.(string); ok && k == instanceIDKey {
		return c.id
	}
	return c.Context.Value(key)
}
