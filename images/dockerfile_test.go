package images

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/chalkcompute/chalkcompute/errdefs"
)

func strp(s string) *string { return &s }

func TestParseDockerfile(t *testing.T) {
	cases := []struct {
		name  string
		text  string
		base  string
		steps []Step
	}{
		{"every supported instruction", `# syntax comment
ARG VERSION=1.36
FROM busybox:${VERSION} AS app
ARG VERSION
ARG NOVALUE
ENV APP=/srv/app MODE=prod
WORKDIR $APP
RUN echo "building $MODE" \
    && mkdir -p data
RUN ["sh", "-c", "echo it's"]
COPY main.py ./
COPY src/ /srv/app/src/
ADD conf.ini a.txt /etc/app/
USER 1000:1000
LABEL version=$VERSION team="ml infra"
MAINTAINER ops@example.test
EXPOSE 8080 53/udp
ENTRYPOINT ["python3"]
CMD app.py --mode $MODE
`, "busybox:1.36", []Step{
			{Kind: KindArg, Name: "VERSION", Value: strp("1.36")},
			{Kind: KindArg, Name: "NOVALUE"},
			{Kind: KindEnv, Env: map[string]string{"APP": "/srv/app", "MODE": "prod"}},
			{Kind: KindWorkdir, Path: "/srv/app"},
			{Kind: KindRun, Commands: []string{`echo "building $MODE"     && mkdir -p data`}},
			{Kind: KindRun, Commands: []string{`exec 'sh' '-c' 'echo it'"'"'s'`}},
			{Kind: KindCopy, Source: "main.py", Dst: "./"},
			{Kind: KindCopy, Source: "src/", Dst: "/srv/app/src/"},
			{Kind: KindCopy, Source: "conf.ini", Dst: "/etc/app/"},
			{Kind: KindCopy, Source: "a.txt", Dst: "/etc/app/"},
			{Kind: KindUser, User: "1000:1000"},
			{Kind: KindLabel, Labels: map[string]string{"version": "1.36", "team": "ml infra"}},
			{Kind: KindLabel, Labels: map[string]string{"maintainer": "ops@example.test"}},
			{Kind: KindExpose, Ports: []string{"53/udp", "8080"}},
			{Kind: KindEntrypoint, Argv: []string{"python3"}},
			{Kind: KindCmd, Argv: []string{"/bin/sh", "-c", "app.py --mode $MODE"}},
		}},
		{"lower case and registry base", "from nvcr.io/nvidia/pytorch:24.01-py3\nrun pip install x\n", "nvcr.io/nvidia/pytorch:24.01-py3",
			[]Step{{Kind: KindRun, Commands: []string{"pip install x"}}}},
		{"FROM only", "FROM python:3.12-slim-bookworm\n", "python:3.12-slim-bookworm", nil},
		{"ENV default expansion", "FROM b\nENV A=${UNSET:-fallback}\n", "b", []Step{{Kind: KindEnv, Env: map[string]string{"A": "fallback"}}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			base, steps, err := ParseDockerfile(c.text)
			if err != nil {
				t.Fatal(err)
			}
			if base != c.base {
				t.Errorf("base %q, want %q", base, c.base)
			}
			if !reflect.DeepEqual(steps, c.steps) {
				t.Errorf("steps\n got %+v\nwant %+v", steps, c.steps)
			}
		})
	}
}

func TestParseDockerfileErrors(t *testing.T) {
	cases := []struct{ name, text, want string }{
		{"empty", "", "no instructions"},
		{"only ARG", "ARG A=1\n", "no FROM"},
		{"no FROM", "RUN true\n", "line 1: RUN: instruction before FROM"},
		{"multi-stage", "FROM a AS build\nRUN make\nFROM b\nCOPY --from=build /x /x\n", "line 3: FROM: multi-stage"},
		{"RUN --mount", "FROM a\nRUN --mount=type=cache,target=/root/.cache pip install x\n", "line 2: RUN: flags are not supported (--mount)"},
		{"RUN --network", "FROM a\nRUN --network=none true\n", "line 2: RUN: flags are not supported (--network)"},
		{"COPY --from", "FROM a\nCOPY --from=other /x /x\n", "line 2: COPY: --from not supported"},
		{"COPY --chown", "FROM a\nCOPY --chown=1:1 x /x\n", "line 2: COPY: --chown not supported"},
		{"ADD URL", "FROM a\nADD https://example.test/x.tgz /x\n", "line 2: ADD: source \"https://example.test/x.tgz\": remote sources"},
		{"ADD archive", "FROM a\nADD rootfs.tar.gz /\n", "ADD of a local archive"},
		{"wildcard", "FROM a\nCOPY *.py /app/\n", "wildcards are not supported"},
		{"outside context", "FROM a\nCOPY ../secret /x\n", "outside the build context"},
		{"several sources need a dir", "FROM a\nCOPY a b /x\n", "destination must end with /"},
		{"ONBUILD", "FROM a\nONBUILD RUN x\n", "line 2: ONBUILD: not supported"},
		{"HEALTHCHECK", "FROM a\n\n\nHEALTHCHECK CMD curl -f http://localhost/\n", "line 4: HEALTHCHECK"},
		{"VOLUME", "FROM a\nVOLUME /data\n", "line 2: VOLUME: not supported"},
		{"SHELL", "FROM a\nSHELL [\"bash\", \"-c\"]\n", "line 2: SHELL"},
		{"STOPSIGNAL", "FROM a\nSTOPSIGNAL SIGKILL\n", "line 2: STOPSIGNAL"},
		{"heredoc", "# syntax=docker/dockerfile:1\nFROM a\nRUN <<EOF\necho hi\nEOF\n", "heredocs"},
		{"platform", "FROM --platform=linux/arm64 a\n", "--platform"},
		{"scratch", "FROM scratch\n", "scratch"},
		{"unresolved FROM variable", "FROM python:${V}\n", `base "python:": not an image reference`},
		{"unknown instruction", "FROM a\nFROBNICATE x\n", "line 2"},
		{"bad ENV", "FROM a\nENV\n", "line 2"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := ParseDockerfile(c.text)
			if err == nil {
				t.Fatalf("no error, want %q", c.want)
			}
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("%v does not wrap ErrInvalidArgument", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not contain %q", err, c.want)
			}
		})
	}
}

func TestDockerfileSources(t *testing.T) {
	got, err := DockerfileSources("FROM a\nCOPY ./src /app/src\nCOPY req.txt main.py /app/\nADD req.txt /b/\n")
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"src", "req.txt", "main.py"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("sources %q, want %q", got, want)
	}
	got, err = DockerfileSources("EXPOSE 80\nCOPY app.py /app/\n") // dockerfile_commands lines
	if err != nil || !reflect.DeepEqual(got, []string{"app.py"}) {
		t.Fatalf("lines: %q, %v", got, err)
	}
	if _, err := DockerfileSources("FROM a\nCOPY ../x /x\n"); err == nil {
		t.Fatal("a source outside the context was accepted")
	}
}

// TestDockerfileCopyResolution checks how COPY destinations resolve with the
// context: a file into a directory keeps its name, a directory's content goes
// to the destination, relative destinations stay relative (to WORKDIR).
func TestDockerfileCopyResolution(t *testing.T) {
	s := Spec{Dockerfile: "FROM b\nCOPY a.py /app/\nCOPY a.py /app/b.py\nCOPY lib /app/lib/\nCOPY a.py .\nCOPY x/y.sh bin/\n",
		Context: map[string]ContextFile{"a.py": {Src: d2}, "./lib/": {Src: d3, IsDir: true}, "x/y.sh": {Src: d3, Mode: 0o700}}}
	c, err := Canonical(s, testDefaults)
	if err != nil {
		t.Fatal(err)
	}
	want := []Step{
		{Kind: KindCopy, Src: d2, Dst: "/app/a.py", Mode: 0o644},
		{Kind: KindCopy, Src: d2, Dst: "/app/b.py", Mode: 0o644},
		{Kind: KindCopy, Src: d3, Dst: "/app/lib", IsDir: true},
		{Kind: KindCopy, Src: d2, Dst: "a.py", Mode: 0o644},
		{Kind: KindCopy, Src: d3, Dst: "bin/y.sh", Mode: 0o755},
	}
	if !reflect.DeepEqual(c.Steps, want) {
		t.Fatalf("steps\n got %+v\nwant %+v", c.Steps, want)
	}
}
