package ecrauth

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"
)

// dockerHubServer is the key Docker uses for Docker Hub in config.json and
// the server URL it hands credential helpers.
const dockerHubServer = "https://index.docker.io/v1/"

// helperTimeout bounds one credential helper run.
const helperTimeout = 30 * time.Second

// DockerConfig holds registry credentials from a Docker config.json:
// "auths" entries, per-registry "credHelpers" and a default "credsStore".
// Helpers are used only if their docker-credential-<name> binary is on PATH.
type DockerConfig struct {
	log     *zap.Logger
	path    string
	auths   map[string]dockerAuth // by normalized host
	helpers map[string]string     // normalized host -> helper binary path
	store   string                // credsStore binary path, "" if none
	// run executes a credential helper; replaced in tests.
	run func(ctx context.Context, bin, server string) ([]byte, error)
}

type dockerAuth struct {
	username string
	password Secret
	// identityToken is an OAuth refresh token (docker login with a token).
	identityToken Secret
}

// dockerConfigFile is the part of config.json that matters here.
type dockerConfigFile struct {
	Auths map[string]struct {
		Auth          string `json:"auth"`
		Username      string `json:"username"`
		Password      string `json:"password"`
		IdentityToken string `json:"identitytoken"`
	} `json:"auths"`
	CredHelpers map[string]string `json:"credHelpers"`
	CredsStore  string            `json:"credsStore"`
}

// DefaultDockerConfigPaths returns the locations tried, in order, when no
// --docker-config is given: $DOCKER_CONFIG/config.json,
// $HOME/.docker/config.json and /root/.docker/config.json (a unit running
// without HOME).
func DefaultDockerConfigPaths(getenv func(string) string) []string {
	var paths []string
	if d := getenv("DOCKER_CONFIG"); d != "" {
		paths = append(paths, filepath.Join(d, "config.json"))
	}
	if h := getenv("HOME"); h != "" {
		paths = append(paths, filepath.Join(h, ".docker", "config.json"))
	}
	root := "/root/.docker/config.json"
	for _, p := range paths {
		if p == root {
			return paths
		}
	}
	return append(paths, root)
}

// LoadDockerConfig reads the Docker config at path. An explicit path must
// exist; with path "" the first of DefaultDockerConfigPaths(os.Getenv) that
// exists is used, and none existing gives an empty config.
func LoadDockerConfig(log *zap.Logger, path string) (*DockerConfig, error) {
	return loadDockerConfig(log, path, os.Getenv, exec.LookPath)
}

func loadDockerConfig(log *zap.Logger, path string, getenv func(string) string, lookPath func(string) (string, error)) (*DockerConfig, error) {
	d := &DockerConfig{
		log:     log.Named("ecrauth"),
		auths:   make(map[string]dockerAuth),
		helpers: make(map[string]string),
		run:     runHelper,
	}
	candidates := []string{path}
	if path == "" {
		candidates = DefaultDockerConfigPaths(getenv)
	}
	for _, c := range candidates {
		data, err := os.ReadFile(c)
		if errors.Is(err, fs.ErrNotExist) && path == "" {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read docker config %s: %w", c, err)
		}
		if err := d.parse(data, lookPath); err != nil {
			return nil, fmt.Errorf("parse docker config %s: %w", c, err)
		}
		d.path = c
		d.log.Debug("loaded docker config", zap.String("path", c),
			zap.Int("auths", len(d.auths)), zap.Int("helpers", len(d.helpers)), zap.Bool("store", d.store != ""))
		break
	}
	return d, nil
}

// Path returns the file the config was read from ("" if none).
func (d *DockerConfig) Path() string { return d.path }

func (d *DockerConfig) parse(data []byte, lookPath func(string) (string, error)) error {
	var f dockerConfigFile
	if err := json.Unmarshal(data, &f); err != nil {
		// json errors quote at most a type name and offset, never content.
		return err
	}
	for key, a := range f.Auths {
		host := normalizeRegistry(key)
		if host == "" {
			continue
		}
		var auth dockerAuth
		switch {
		case a.Auth != "":
			raw, err := base64.StdEncoding.DecodeString(a.Auth)
			if err != nil {
				return fmt.Errorf("auths[%s].auth is not base64", host)
			}
			user, pass, ok := strings.Cut(string(raw), ":")
			if !ok {
				return fmt.Errorf("auths[%s].auth is not user:password", host)
			}
			auth.username, auth.password = user, Secret(pass)
		case a.Username != "" || a.Password != "":
			auth.username, auth.password = a.Username, Secret(a.Password)
		}
		auth.identityToken = Secret(a.IdentityToken)
		if auth.username == "" && auth.password == "" && auth.identityToken == "" {
			continue // an entry a credsStore owns
		}
		d.auths[host] = auth
	}
	for key, name := range f.CredHelpers {
		host := normalizeRegistry(key)
		if bin := d.findHelper(name, lookPath); host != "" && bin != "" {
			d.helpers[host] = bin
		}
	}
	if f.CredsStore != "" {
		d.store = d.findHelper(f.CredsStore, lookPath)
	}
	return nil
}

func (d *DockerConfig) findHelper(name string, lookPath func(string) (string, error)) string {
	if name == "" || strings.ContainsAny(name, `/\`) {
		return ""
	}
	bin, err := lookPath("docker-credential-" + name)
	if err != nil {
		d.log.Warn("docker credential helper not on PATH; ignoring it", zap.String("helper", "docker-credential-"+name))
		return ""
	}
	return bin
}

// Lookup returns credentials for a registry host (host or host:port, as
// containerd's resolver passes it). found is false when the config has
// nothing for host. A helper is asked first (credHelpers, then credsStore),
// then the auths entry. For an identity token the username is empty and the
// token is returned as the secret, which containerd uses as a refresh token.
func (d *DockerConfig) Lookup(ctx context.Context, host string) (username, secret string, found bool, err error) {
	if d == nil {
		return "", "", false, nil
	}
	key := normalizeRegistry(host)
	bins := []string{}
	if bin, ok := d.helpers[key]; ok {
		bins = append(bins, bin)
	}
	if d.store != "" {
		bins = append(bins, d.store)
	}
	for _, bin := range bins {
		u, s, ok, err := d.fromHelper(ctx, bin, key)
		if err != nil {
			return "", "", false, err
		}
		if ok {
			return u, s, true, nil
		}
	}
	if a, ok := d.auths[key]; ok {
		if a.identityToken != "" {
			return "", a.identityToken.Reveal(), true, nil
		}
		return a.username, a.password.Reveal(), true, nil
	}
	return "", "", false, nil
}

// helperNotFound is what docker-credential-helpers print on stdout when they
// hold nothing for the server.
const helperNotFound = "credentials not found in native keychain"

func (d *DockerConfig) fromHelper(ctx context.Context, bin, key string) (string, string, bool, error) {
	server := key
	if key == "docker.io" {
		server = dockerHubServer
	}
	ctx, cancel := context.WithTimeout(ctx, helperTimeout)
	defer cancel()
	out, err := d.run(ctx, bin, server)
	if err != nil {
		if bytes.Contains(out, []byte(helperNotFound)) {
			return "", "", false, nil
		}
		// The helper's output is not quoted: it could echo a secret.
		return "", "", false, fmt.Errorf("credential helper %s get %s: %w", filepath.Base(bin), key, err)
	}
	var resp struct {
		Username string `json:"Username"`
		Secret   string `json:"Secret"`
	}
	if err := json.Unmarshal(out, &resp); err != nil {
		return "", "", false, fmt.Errorf("credential helper %s get %s: unreadable output", filepath.Base(bin), key)
	}
	if resp.Secret == "" {
		return "", "", false, nil
	}
	if resp.Username == "<token>" {
		return "", resp.Secret, true, nil
	}
	return resp.Username, resp.Secret, true, nil
}

// runHelper runs "<bin> get" with the server on stdin, as Docker does.
func runHelper(ctx context.Context, bin, server string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, bin, "get")
	cmd.Stdin = strings.NewReader(server)
	var stdout bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = nil
	err := cmd.Run()
	return stdout.Bytes(), err
}

// normalizeRegistry turns a config.json key or a request host into the
// registry host: scheme and path dropped, lower case, Docker Hub's aliases
// folded into "docker.io".
func normalizeRegistry(s string) string {
	s = strings.TrimSpace(strings.ToLower(s))
	if i := strings.Index(s, "://"); i >= 0 {
		s = s[i+3:]
	}
	if i := strings.IndexAny(s, "/?#"); i >= 0 {
		s = s[:i]
	}
	if i := strings.LastIndexByte(s, '@'); i >= 0 {
		s = s[i+1:] // never keep userinfo
	}
	switch s {
	case "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com", "docker.io":
		return "docker.io"
	}
	return s
}
