package agent

import (
	"context"
	"strings"
	"testing"

	"github.com/prepull/prepull/manifest"
)

func TestRecordNames(t *testing.T) {
	t.Parallel()
	d := "sha256:" + strings.Repeat("b", 64)
	got, err := recordNames(manifest.Image{Ref: "docker.io/library/nginx:1.25"}, d, "sha256:cfg")
	if err != nil || strings.Join(got, " ") != "sha256:cfg docker.io/library/nginx:1.25 docker.io/library/nginx@"+d {
		t.Errorf("recordNames(tag) = %v, %v", got, err)
	}
	got, err = recordNames(manifest.Image{Ref: "docker.io/library/nginx@" + d}, d, "sha256:cfg")
	if err != nil || strings.Join(got, " ") != "sha256:cfg docker.io/library/nginx@"+d {
		t.Errorf("recordNames(digest) = %v, %v", got, err)
	}
	// repo:tag@digest keeps the tag record a pod naming the tag needs.
	m, err := manifest.Parse("m", []byte("nginx:1.25@"+d+"\nnginx:1.25.3@"+d+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	got, err = recordNames(m.Images[0], d, "sha256:cfg")
	if err != nil || strings.Join(got, " ") != "sha256:cfg docker.io/library/nginx:1.25 docker.io/library/nginx@"+d {
		t.Errorf("recordNames(tag@digest) = %v, %v", got, err)
	}
}

func TestKeyedMutex(t *testing.T) {
	t.Parallel()
	k := newKeyedMutex()
	ctx := t.Context()
	if err := k.Lock(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if err := k.Lock(ctx, "b"); err != nil {
		t.Fatal("a different key must not block:", err)
	}
	cctx, cancel := contextWithCancel(ctx)
	cancel()
	if err := k.Lock(cctx, "a"); err == nil {
		t.Fatal("locking a held key with a cancelled context must fail")
	}
	k.Unlock("a")
	k.Unlock("b")
	if err := k.Lock(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	k.Unlock("a")
	if len(k.locks) != 0 {
		t.Errorf("locks leaked: %v", k.locks)
	}
}

func contextWithCancel(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithCancel(ctx)
}
