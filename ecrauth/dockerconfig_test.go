package ecrauth

import (
	"encoding/base64"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// writeHelper writes an executable docker-credential-<name> shell script.
func writeHelper(t *testing.T, dir, name, script string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "docker-credential-"+name), []byte("#!/bin/sh\n"+script), 0o755); err != nil {
		t.Fatal(err)
	}
}

// lookIn finds binaries only in dir (a PATH of one directory).
func lookIn(dir string) func(string) (string, error) {
	return func(name string) (string, error) {
		p := filepath.Join(dir, name)
		if _, err := os.Stat(p); err != nil {
			return "", exec.ErrNotFound
		}
		return p, nil
	}
}

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func TestDockerConfigLookup(t *testing.T) {
	t.Parallel()
	bin := t.TempDir()
	// A helper that knows one server and echoes what it was asked for.
	writeHelper(t, bin, "team", `read server
case "$server" in
  helped.example.com) echo '{"ServerURL":"helped.example.com","Username":"helper-user","Secret":"helper-secret"}' ;;
  https://index.docker.io/v1/) echo '{"ServerURL":"x","Username":"<token>","Secret":"hub-identity-token"}' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
`)
	writeHelper(t, bin, "store", `read server
case "$server" in
  stored.example.com) echo '{"Username":"store-user","Secret":"store-secret"}' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
`)
	writeHelper(t, bin, "broken", `echo 'leaky-secret-output'; exit 3`)

	cfg := `{
	  "auths": {
	    "https://index.docker.io/v1/": {"auth": "` + b64("hubuser:hubpass") + `"},
	    "registry.example.com:5000": {"auth": "` + b64("alice:pa:ss") + `"},
	    "https://plain.example.com/v2/": {"username": "bob", "password": "bobpass"},
	    "token.example.com": {"identitytoken": "refresh-token-1"},
	    "owned-by-store.example.com": {},
	    "stored.example.com": {"auth": "` + b64("stale:stale") + `"}
	  },
	  "credHelpers": {
	    "helped.example.com": "team",
	    "missing.example.com": "nosuchhelper",
	    "broken.example.com": "broken",
	    "docker.io": "team"
	  },
	  "credsStore": "store"
	}`
	log, logs := newTestLogger(t)
	d, err := loadDockerConfig(log, writeConfig(t, cfg), os.Getenv, lookIn(bin))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "docker-credential-nosuchhelper") {
		t.Errorf("missing helper not warned about: %s", logs.String())
	}

	tests := []struct {
		name       string
		host       string
		user, pass string
		found      bool
		wantErr    bool
	}{
		{name: "auths host:port, password with colon", host: "registry.example.com:5000", user: "alice", pass: "pa:ss", found: true},
		{name: "auths URL key", host: "plain.example.com", user: "bob", pass: "bobpass", found: true},
		{name: "identity token", host: "token.example.com", user: "", pass: "refresh-token-1", found: true},
		{name: "credHelper", host: "helped.example.com", user: "helper-user", pass: "helper-secret", found: true},
		{name: "docker hub via helper identity token", host: "registry-1.docker.io", user: "", pass: "hub-identity-token", found: true},
		{name: "credsStore wins over auths", host: "stored.example.com", user: "store-user", pass: "store-secret", found: true},
		{name: "helper binary missing: ignored", host: "missing.example.com", found: false},
		{name: "store has nothing, auths empty", host: "owned-by-store.example.com", found: false},
		{name: "unknown host", host: "other.example.com", found: false},
		{name: "helper fails", host: "broken.example.com", wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			user, pass, found, err := d.Lookup(t.Context(), tc.host)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tc.wantErr)
			}
			if err != nil {
				if !strings.Contains(err.Error(), "docker-credential-broken") || !strings.Contains(err.Error(), tc.host) {
					t.Errorf("error %q should name the helper and host", err)
				}
				assertNoSecret(t, "error", err.Error(), "leaky-secret-output")
				return
			}
			if found != tc.found || user != tc.user || pass != tc.pass {
				t.Errorf("Lookup(%q) = %q, pass ok %v, found %v; want %q, found %v", tc.host, user, pass == tc.pass, found, tc.user, tc.found)
			}
		})
	}
}

func TestDockerConfigAuthsWithoutHelpers(t *testing.T) {
	t.Parallel()
	cfg := `{"auths": {"https://index.docker.io/v1/": {"auth": "` + b64("hubuser:hubpass") + `"}}, "credsStore": "desktop"}`
	log, _ := newTestLogger(t)
	d, err := loadDockerConfig(log, writeConfig(t, cfg), os.Getenv, lookIn(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	for _, host := range []string{"docker.io", "registry-1.docker.io", "index.docker.io"} {
		user, pass, found, err := d.Lookup(t.Context(), host)
		if err != nil || !found || user != "hubuser" || pass != "hubpass" {
			t.Errorf("Lookup(%q) = %q, found %v, err %v", host, user, found, err)
		}
	}
}

func TestLoadDockerConfigErrors(t *testing.T) {
	t.Parallel()
	log, _ := newTestLogger(t)
	tests := []struct {
		name    string
		body    string
		want    string
		missing bool
	}{
		{name: "explicit path missing", missing: true, want: "read docker config"},
		{name: "not json", body: `{"auths": {"x": {"auth": "c2VjcmV0LXZhbHVl"`, want: "parse docker config"},
		{name: "auth not base64", body: `{"auths": {"x.example.com": {"auth": "!!!not-base64-secret"}}}`, want: "auths[x.example.com].auth is not base64"},
		{name: "auth without colon", body: `{"auths": {"x.example.com": {"auth": "` + b64("nocolonsecret") + `"}}}`, want: "not user:password"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), "nope.json")
			if !tc.missing {
				path = writeConfig(t, tc.body)
			}
			_, err := loadDockerConfig(log, path, os.Getenv, lookIn(t.TempDir()))
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), path) {
				t.Fatalf("err = %v, want %q naming %s", err, tc.want, path)
			}
			if tc.missing && !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("err = %v, want fs.ErrNotExist", err)
			}
			assertNoSecret(t, "error", err.Error(), "secret-value", "!!!not-base64-secret", "nocolonsecret")
		})
	}
}

func TestDefaultDockerConfigPaths(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		env  map[string]string
		want []string
	}{
		{name: "all", env: map[string]string{"DOCKER_CONFIG": "/etc/dc", "HOME": "/home/u"},
			want: []string{"/etc/dc/config.json", "/home/u/.docker/config.json", "/root/.docker/config.json"}},
		{name: "root home", env: map[string]string{"HOME": "/root"}, want: []string{"/root/.docker/config.json"}},
		{name: "no HOME (systemd unit)", env: map[string]string{}, want: []string{"/root/.docker/config.json"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := DefaultDockerConfigPaths(func(k string) string { return tc.env[k] })
			if !slices.Equal(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestLoadDockerConfigDefaultLocations(t *testing.T) {
	t.Parallel()
	log, _ := newTestLogger(t)
	home := t.TempDir()
	dc := t.TempDir()
	env := map[string]string{"HOME": home, "DOCKER_CONFIG": dc}
	getenv := func(k string) string { return env[k] }

	// Only ~/.docker/config.json exists: it is used. ($DOCKER_CONFIG is
	// empty; /root/.docker may exist on the machine but comes last.)
	if err := os.MkdirAll(filepath.Join(home, ".docker"), 0o700); err != nil {
		t.Fatal(err)
	}
	homeCfg := filepath.Join(home, ".docker", "config.json")
	if err := os.WriteFile(homeCfg, []byte(`{"auths":{"a.example.com":{"username":"u","password":"p"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := loadDockerConfig(log, "", getenv, lookIn(t.TempDir()))
	if err != nil || d.Path() != homeCfg {
		t.Fatalf("path = %q, err %v; want %s", d.Path(), err, homeCfg)
	}
	// $DOCKER_CONFIG wins when it has a config.json.
	dcCfg := filepath.Join(dc, "config.json")
	if err := os.WriteFile(dcCfg, []byte(`{}`), 0o600); err != nil {
		t.Fatal(err)
	}
	d, err = loadDockerConfig(log, "", getenv, lookIn(t.TempDir()))
	if err != nil || d.Path() != dcCfg {
		t.Fatalf("path = %q, err %v; want %s", d.Path(), err, dcCfg)
	}
	if _, _, found, _ := d.Lookup(t.Context(), "a.example.com"); found {
		t.Error("entry from the lower-priority file leaked in")
	}
}
