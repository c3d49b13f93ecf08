package mcpgw

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// decodeReference is the json.Decoder-based strict reader decodeStrict
// replaced: the differential tests hold the two to the same results.
func decodeReference(b []byte) (value, error) {
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	v, err := refValue(d, 0)
	if err != nil {
		return value{}, err
	}
	if _, err := d.Token(); err != io.EOF {
		return value{}, errors.New("data after the JSON value")
	}
	return v, nil
}

func refValue(d *json.Decoder, depth int) (value, error) {
	t, err := d.Token()
	if err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return value{}, err
	}
	return refFrom(d, t, depth)
}

func refFrom(d *json.Decoder, t json.Token, depth int) (value, error) {
	switch t := t.(type) {
	case json.Delim:
		if depth >= maxDepth {
			return value{}, fmt.Errorf("nested deeper than %d", maxDepth)
		}
		switch t {
		case '{':
			v := value{kind: 'o', obj: []member{}}
			seen := map[string]bool{}
			for d.More() {
				kt, err := d.Token()
				if err != nil {
					return value{}, err
				}
				k, ok := kt.(string)
				if !ok {
					return value{}, errors.New("object key is not a string")
				}
				if seen[k] {
					return value{}, fmt.Errorf("duplicate key %q", k)
				}
				seen[k] = true
				mv, err := refValue(d, depth+1)
				if err != nil {
					return value{}, err
				}
				v.obj = append(v.obj, member{k, mv})
			}
			if _, err := d.Token(); err != nil { // '}'
				return value{}, err
			}
			return v, nil
		case '[':
			v := value{kind: 'a', arr: []value{}}
			for d.More() {
				ev, err := refValue(d, depth+1)
				if err != nil {
					return value{}, err
				}
				v.arr = append(v.arr, ev)
			}
			if _, err := d.Token(); err != nil { // ']'
				return value{}, err
			}
			return v, nil
		}
		return value{}, fmt.Errorf("unexpected %v", t)
	case string:
		return value{kind: 's', str: t}, nil
	case json.Number:
		return value{kind: 'n', str: string(t)}, nil
	case bool:
		if t {
			return value{kind: 'b', str: "true"}, nil
		}
		return value{kind: 'b', str: "false"}, nil
	case nil:
		return value{kind: 'z'}, nil
	}
	return value{}, fmt.Errorf("unexpected token %v", t)
}
