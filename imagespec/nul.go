package imagespec

import (
	"fmt"
	"reflect"
	"strings"
)

// nulField returns the JSON path of the first string in v that holds a NUL
// byte ("" if none). Every string of a spec ends up in an argv, a path, an
// environment or a file name, none of which can carry NUL: a spec holding
// one is refused at parse time, naming the field.
func nulField(v reflect.Value, at string) string {
	switch v.Kind() {
	case reflect.String:
		if strings.IndexByte(v.String(), 0) >= 0 {
			return at
		}
	case reflect.Pointer, reflect.Interface:
		if !v.IsNil() {
			return nulField(v.Elem(), at)
		}
	case reflect.Slice, reflect.Array:
		for i := range v.Len() {
			if f := nulField(v.Index(i), fmt.Sprintf("%s[%d]", at, i)); f != "" {
				return f
			}
		}
	case reflect.Map:
		iter := v.MapRange()
		for iter.Next() {
			k := fmt.Sprint(iter.Key().Interface())
			if f := nulField(iter.Key(), at+"{key}"); f != "" {
				return f
			}
			if f := nulField(iter.Value(), at+"."+k); f != "" {
				return f
			}
		}
	case reflect.Struct:
		t := v.Type()
		for i := range t.NumField() {
			if !t.Field(i).IsExported() {
				continue
			}
			name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
			if name == "" || name == "-" {
				name = t.Field(i).Name
			}
			if at != "" {
				name = at + "." + name
			}
			if f := nulField(v.Field(i), name); f != "" {
				return f
			}
		}
	}
	return ""
}
