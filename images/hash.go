package images

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"unicode/utf8"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// hashStep is the part of a canonical step that is hashed: everything but
// Force and Source.
func hashStep(st Step) Step {
	st.Force = false
	st.Source = ""
	return st
}

// StepJSON is the canonical JSON of one canonical step as it is hashed
// (without force).
func StepJSON(st Step) []byte { return CanonicalJSON(hashStep(st)) }

// SpecJSON is the canonical JSON of a canonical spec as the golden vectors
// record it: {"base": ..., "steps": [...]} with steps as StepJSON; mounts and
// force flags are left out.
func SpecJSON(canon Spec) []byte {
	steps := make([]Step, len(canon.Steps))
	for i, st := range canon.Steps {
		steps[i] = hashStep(st)
	}
	return CanonicalJSON(struct {
		Base  string `json:"base"`
		Steps []Step `json:"steps"`
	}{canon.Base, steps})
}

var hexDigestRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)

// Keys computes the chained cache keys of a canonical spec:
//
//	k0 = sha256(canonical_json({"schema": SchemaVersion, "builder": builderVersion,
//	        "platform": platform, "base": canon.Base, "base_digest": baseDigest}))
//	ki = sha256(k(i-1) + "\n" + canonical_json(step i without force))
//
// each written "sha256:<hex>". keys[0] is the base, keys[i] the image after
// step i; the last key is the image hash. baseDigest is the manifest digest
// the base reference resolved to. canon must come from Canonical.
func Keys(canon Spec, baseDigest string, platform string, builderVersion string) ([]string, error) {
	if canon.Base == "" {
		return nil, fmt.Errorf("image keys: base: required: %w", errdefs.ErrInvalidArgument)
	}
	if !hexDigestRE.MatchString(baseDigest) {
		return nil, fmt.Errorf("image keys: base digest %q: want sha256:<64 hex>: %w", baseDigest, errdefs.ErrInvalidArgument)
	}
	if platform == "" || builderVersion == "" {
		return nil, fmt.Errorf("image keys: platform and builder version are required: %w", errdefs.ErrInvalidArgument)
	}
	h := sha256.Sum256(CanonicalJSON(map[string]any{
		"schema": SchemaVersion, "builder": builderVersion, "platform": platform,
		"base": canon.Base, "base_digest": baseDigest,
	}))
	keys := make([]string, 0, len(canon.Steps)+1)
	keys = append(keys, "sha256:"+hex.EncodeToString(h[:]))
	for i, st := range canon.Steps {
		// A step that Canonical would change is not canonical: hashing it
		// would give a key nobody else computes.
		cs, err := canonicalStep(hashStep(st), nil, map[string]string{})
		if err != nil || !bytes.Equal(StepJSON(cs), StepJSON(st)) {
			return nil, fmt.Errorf("image keys: step %d (%s) is not canonical (use Canonical first): %w", i, st.Kind, errdefs.ErrInvalidArgument)
		}
		b := append([]byte(keys[i]+"\n"), StepJSON(st)...)
		h := sha256.Sum256(b)
		keys = append(keys, "sha256:"+hex.EncodeToString(h[:]))
	}
	return keys, nil
}

// CanonicalJSON encodes v (anything encoding/json accepts) canonically:
// object keys sorted by code point, no insignificant whitespace, integers
// without exponent or fraction, strings as UTF-8 with only '"', '\\' and
// control characters below U+0020 escaped (\b \t \n \f \r short, the others
// \u00xx lowercase). This is what Python's json.dumps(v, sort_keys=True,
// separators=(",", ":"), ensure_ascii=False) produces for our values.
func CanonicalJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("images: canonical JSON of %T: %v", v, err)) // only our own types are encoded
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var g any
	if err := dec.Decode(&g); err != nil {
		panic(fmt.Sprintf("images: canonical JSON round trip: %v", err))
	}
	var buf bytes.Buffer
	writeCanonical(&buf, g)
	return buf.Bytes()
}

func writeCanonical(buf *bytes.Buffer, v any) {
	switch x := v.(type) {
	case nil:
		buf.WriteString("null")
	case bool:
		buf.WriteString(strconv.FormatBool(x))
	case json.Number:
		buf.WriteString(x.String())
	case string:
		writeString(buf, x)
	case []any:
		buf.WriteByte('[')
		for i, e := range x {
			if i > 0 {
				buf.WriteByte(',')
			}
			writeCanonical(buf, e)
		}
		buf.WriteByte(']')
	case map[string]any:
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		sort.Strings(keys) // byte order of UTF-8 is code point order
		buf.WriteByte('{')
		for i, k := range keys {
			if i > 0 {
				buf.WriteByte(',')
			}
			writeString(buf, k)
			buf.WriteByte(':')
			writeCanonical(buf, x[k])
		}
		buf.WriteByte('}')
	default:
		panic(fmt.Sprintf("images: canonical JSON: unexpected %T", v))
	}
}

func writeString(buf *bytes.Buffer, s string) {
	const hexd = "0123456789abcdef"
	buf.WriteByte('"')
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == '"':
			buf.WriteString(`\"`)
		case r == '\\':
			buf.WriteString(`\\`)
		case r == '\b':
			buf.WriteString(`\b`)
		case r == '\f':
			buf.WriteString(`\f`)
		case r == '\n':
			buf.WriteString(`\n`)
		case r == '\r':
			buf.WriteString(`\r`)
		case r == '\t':
			buf.WriteString(`\t`)
		case r < 0x20:
			buf.WriteString(`\u00`)
			buf.WriteByte(hexd[r>>4])
			buf.WriteByte(hexd[r&0xf])
		default:
			buf.WriteString(s[i : i+size]) // json.Marshal already made it valid UTF-8
		}
		i += size
	}
	buf.WriteByte('"')
}
