// Package tartest makes hostile tar archives for tests.
package tartest

import (
	"archive/tar"
	"bytes"
	"fmt"
)

// SparseBomb is a tar of one PAX 0.1 sparse file "big" that reads as size
// bytes, of which only the first is data: about 1.5 KB on the wire.
// (archive/tar writes no GNU.sparse records, so the 'x' header is made
// by hand.)
func SparseBomb(size int64) []byte {
	rec := func(k, v string) string {
		s := " " + k + "=" + v + "\n"
		for d := 1; ; d++ {
			if len(fmt.Sprint(len(s)+d)) == d {
				return fmt.Sprint(len(s)+d) + s
			}
		}
	}
	recs := rec("GNU.sparse.numblocks", "1") + rec("GNU.sparse.map", "0,1") + rec("GNU.sparse.size", fmt.Sprint(size))
	h := make([]byte, 512)
	copy(h[0:], "PaxHeader")
	copy(h[100:], "0000644\x00")
	copy(h[108:], "0000000\x00")
	copy(h[116:], "0000000\x00")
	copy(h[124:], fmt.Sprintf("%011o\x00", len(recs)))
	copy(h[136:], "00000000000\x00")
	h[156] = tar.TypeXHeader
	copy(h[257:], "ustar\x0000")
	copy(h[148:], "        ")
	sum := 0
	for _, b := range h {
		sum += int(b)
	}
	copy(h[148:], fmt.Sprintf("%06o\x00 ", sum))
	data := make([]byte, (len(recs)+511)/512*512)
	copy(data, recs)
	buf := bytes.NewBuffer(append(h, data...))
	tw := tar.NewWriter(buf)
	if err := tw.WriteHeader(&tar.Header{Name: "big", Typeflag: tar.TypeReg, Size: 1, Mode: 0o644, Format: tar.FormatUSTAR}); err != nil {
		panic(err) // a fixed header: cannot fail
	}
	tw.Write([]byte("x"))
	tw.Close()
	return buf.Bytes()
}
