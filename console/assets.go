package console

import (
	"embed"
	"io/fs"
	"net/http"
)

// The console's own pages are in assets/; xterm.js is under assets/vendor/,
// fetched from the npm registry at the versions and integrities pinned in
// assets.lock by scripts/console-assets.sh (scripts/build.sh runs it).
//
// A build error "pattern assets/vendor/...: no matching files found" here
// means the vendored libraries are missing: run scripts/console-assets.sh.
//
//go:embed assets/index.html assets/app.js assets/app.css
//go:embed assets/vendor/xterm/xterm/xterm.js assets/vendor/xterm/xterm/xterm.css assets/vendor/xterm/xterm/LICENSE
//go:embed assets/vendor/xterm/addon-fit/addon-fit.js assets/vendor/xterm/addon-fit/LICENSE
var assets embed.FS

func assetFS() fs.FS {
	sub, err := fs.Sub(assets, "assets")
	if err != nil {
		panic(err)
	}
	return sub
}

// assetServer serves the embedded files (no directory listings).
func assetServer() http.Handler {
	files := http.FileServerFS(assetFS())
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "" || r.URL.Path[len(r.URL.Path)-1] == '/' {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Cache-Control", "no-cache")
		files.ServeHTTP(w, r)
	})
}

// serveAsset serves one embedded file.
func serveAsset(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-cache")
		http.ServeFileFS(w, r, assetFS(), name)
	})
}
