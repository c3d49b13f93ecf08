package imagespec

import (
	"fmt"
	"strings"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

// Variable substitution in ENV, WORKDIR, LABEL and USER values and in the
// destination of a Dockerfile COPY/ADD, as a Dockerfile build does it:
// $NAME and ${NAME} take the value of the build argument or environment
// variable NAME in force before the step (the image's own ENV wins over an
// ARG of the same name; unset is empty), ${NAME:-word} gives word when NAME
// is unset or empty, ${NAME:+word} gives word when it is set and not empty,
// and \$ is a literal $. Anything else after a $ (a digit, punctuation, the
// end) stays as written. The image hash is computed over the values as
// written: the substitution depends only on the base image (whose digest
// is in the hash chain) and earlier steps, so the result is as reproducible
// as the hash.

// ExpandVars substitutes variables in s from env (the image config's
// KEY=VALUE list) and args (build arguments).
func ExpandVars(s string, env []string, args map[string]string) (string, error) {
	if !strings.ContainsAny(s, "$\\") {
		return s, nil
	}
	lookup := func(name string) (string, bool) {
		for i := len(env) - 1; i >= 0; i-- {
			if k, v, _ := strings.Cut(env[i], "="); k == name {
				return v, true
			}
		}
		v, ok := args[name]
		return v, ok
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '\\' && i+1 < len(s) && s[i+1] == '$' {
			b.WriteByte('$')
			i++
			continue
		}
		if c != '$' || i+1 == len(s) {
			b.WriteByte(c)
			continue
		}
		if s[i+1] == '{' {
			end := strings.IndexByte(s[i:], '}')
			if end < 0 {
				return "", fmt.Errorf("%q: unterminated ${ at offset %d: %w", s, i, errdefs.ErrInvalidArgument)
			}
			expr := s[i+2 : i+end]
			name, op, word := expr, "", ""
			if j := strings.Index(expr, ":"); j >= 0 {
				name, op = expr[:j], expr[j:]
				if len(op) < 2 || (op[1] != '-' && op[1] != '+') {
					return "", fmt.Errorf("%q: unsupported substitution ${%s} (want ${NAME}, ${NAME:-word} or ${NAME:+word}): %w", s, expr, errdefs.ErrInvalidArgument)
				}
				op, word = op[:2], op[2:]
			}
			if !validVarName(name) {
				return "", fmt.Errorf("%q: bad variable name in ${%s}: %w", s, expr, errdefs.ErrInvalidArgument)
			}
			v, _ := lookup(name)
			switch {
			case op == ":-" && v == "":
				v = word
			case op == ":+" && v != "":
				v = word
			case op == ":+":
				v = ""
			}
			b.WriteString(v)
			i += end
			continue
		}
		j := i + 1
		for j < len(s) && (s[j] == '_' || isAlpha(s[j]) || (j > i+1 && isDigit(s[j]))) {
			j++
		}
		if j == i+1 { // not a name: keep the $
			b.WriteByte(c)
			continue
		}
		v, _ := lookup(s[i+1 : j])
		b.WriteString(v)
		i = j - 1
	}
	return b.String(), nil
}

func validVarName(n string) bool {
	if n == "" || isDigit(n[0]) {
		return false
	}
	for i := 0; i < len(n); i++ {
		if n[i] != '_' && !isAlpha(n[i]) && !isDigit(n[i]) {
			return false
		}
	}
	return true
}

func isAlpha(c byte) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }
func isDigit(c byte) bool { return c >= '0' && c <= '9' }
