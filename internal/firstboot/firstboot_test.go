package firstboot

import (
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fakeIMDS speaks the IMDSv2 protocol: PUT /latest/api/token with a TTL header
// returns a token; GET /latest/meta-data/instance-id answers only with it.
type fakeIMDS struct {
	mu        sync.Mutex
	id        string
	tokenCode int // status of the token PUT; 0 means 200
	gets      atomic.Int32
}

const fakeToken = "AQAEAFAKE-token=="

func (f *fakeIMDS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.Method == http.MethodPut && r.URL.Path == "/latest/api/token":
		if r.Header.Get("X-aws-ec2-metadata-token-ttl-seconds") == "" {
			http.Error(w, "missing ttl", http.StatusBadRequest)
			return
		}
		if f.tokenCode != 0 {
			http.Error(w, "token refused", f.tokenCode)
			return
		}
		w.Header().Set("X-aws-ec2-metadata-token-ttl-seconds", "21600")
		_, _ = w.Write([]byte(fakeToken))
	case r.Method == http.MethodGet && r.URL.Path == "/latest/meta-data/instance-id":
		f.gets.Add(1)
		if r.Header.Get("X-aws-ec2-metadata-token") != fakeToken {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		f.mu.Lock()
		id := f.id
		f.mu.Unlock()
		_, _ = w.Write([]byte(id))
	default:
		http.NotFound(w, r)
	}
}

func writeMarker(t *testing.T, dir, id string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, MarkerName), []byte(id+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestCheck(t *testing.T) {
	t.Parallel()
	const self = "i-0123456789abcdef0"
	tests := []struct {
		name       string
		marker     string // "" means no marker file
		down       bool   // IMDS endpoint refuses connections
		tokenCode  int
		force      bool
		wantRun    bool
		wantReason Reason
		wantID     string
	}{
		{name: "new instance, no marker", wantRun: true, wantReason: NewInstance, wantID: self},
		{name: "new instance, marker of the build instance", marker: "i-0aaaaaaaaaaaaaaaa", wantRun: true, wantReason: NewInstance, wantID: self},
		{name: "same instance reboots", marker: self, wantRun: false, wantReason: SameInstance, wantID: self},
		{name: "same instance forced", marker: self, force: true, wantRun: true, wantReason: Forced, wantID: self},
		{name: "imds down", marker: self, down: true, wantRun: true, wantReason: IMDSUnavailable},
		{name: "imds down forced", down: true, force: true, wantRun: true, wantReason: Forced},
		{name: "imdsv1 only: no fallback", marker: self, tokenCode: http.StatusForbidden, wantRun: true, wantReason: IMDSUnavailable},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			if tc.marker != "" {
				writeMarker(t, dir, tc.marker)
			}
			fake := &fakeIMDS{id: self, tokenCode: tc.tokenCode}
			srv := httptest.NewServer(fake)
			endpoint := srv.URL
			if tc.down {
				srv.Close() // the port now refuses connections
			} else {
				t.Cleanup(srv.Close)
			}
			core, logs := observer.New(zap.DebugLevel)
			d, err := Check(t.Context(), zap.New(core), dir, NewClient(endpoint), tc.force)
			if err != nil {
				t.Fatalf("Check: %v", err)
			}
			if d.Run != tc.wantRun || d.Reason != tc.wantReason || d.InstanceID != tc.wantID {
				t.Fatalf("Check = {Run:%v Reason:%s ID:%q}, want {Run:%v Reason:%s ID:%q}",
					d.Run, d.Reason, d.InstanceID, tc.wantRun, tc.wantReason, tc.wantID)
			}
			if d.Previous != tc.marker {
				t.Errorf("Previous = %q, want %q", d.Previous, tc.marker)
			}
			unavailable := tc.down || tc.tokenCode != 0
			if got := logs.FilterMessageSnippet("IMDS").Len(); unavailable != (got == 1) {
				t.Errorf("IMDS warning logged %d times, want it iff IMDS is unavailable (%v)", got, unavailable)
			}
			if unavailable && d.LookupErr == nil {
				t.Error("LookupErr is nil although IMDS was unavailable")
			}
			if tc.tokenCode != 0 && fake.gets.Load() != 0 {
				t.Errorf("instance-id fetched %d times without a token (IMDSv1 fallback)", fake.gets.Load())
			}
		})
	}
}

// TestFirstBootThenReboot walks the life of a marker: the first boot runs and
// marks, the reboot skips, a new instance from the same volume runs again.
func TestFirstBootThenReboot(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "state") // created by MarkDone
	fake := &fakeIMDS{id: "i-0000000000000000a"}
	srv := httptest.NewServer(fake)
	t.Cleanup(srv.Close)
	client := NewClient(srv.URL)
	log := zap.NewNop()

	steps := []struct {
		id      string
		wantRun bool
	}{
		{"i-0000000000000000a", true},  // first boot
		{"i-0000000000000000a", false}, // reboot
		{"i-0000000000000000b", true},  // AMI launched again
		{"i-0000000000000000b", false},
	}
	for i, s := range steps {
		fake.mu.Lock()
		fake.id = s.id
		fake.mu.Unlock()
		d, err := Check(t.Context(), log, dir, client, false)
		if err != nil {
			t.Fatalf("step %d: Check: %v", i, err)
		}
		if d.Run != s.wantRun {
			t.Fatalf("step %d (%s): Run = %v (%s), want %v", i, s.id, d.Run, d.Reason, s.wantRun)
		}
		if d.Run {
			if err := MarkDone(dir, d); err != nil {
				t.Fatalf("step %d: MarkDone: %v", i, err)
			}
		}
		b, err := os.ReadFile(filepath.Join(dir, MarkerName))
		if err != nil || string(b) != s.id+"\n" {
			t.Fatalf("step %d: marker = %q, %v; want %q", i, b, err, s.id+"\n")
		}
	}
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) != 1 {
		t.Fatalf("state dir holds %v (%v), want only the marker", ents, err)
	}
	if fi, _ := os.Stat(filepath.Join(dir, MarkerName)); fi.Mode().Perm() != 0o644 {
		t.Errorf("marker mode = %v, want 0644", fi.Mode().Perm())
	}
}

func TestMarkDoneWithoutIdentity(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if err := MarkDone(dir, Decision{Run: true, Reason: IMDSUnavailable}); err != nil {
		t.Fatalf("MarkDone: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, MarkerName)); !os.IsNotExist(err) {
		t.Fatalf("marker written without an instance-id (stat err %v)", err)
	}
}

func TestCheckUnreadableMarker(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	// A directory where the marker should be cannot be read as a file.
	if err := os.Mkdir(filepath.Join(dir, MarkerName), 0o755); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(&fakeIMDS{id: "i-0123456789abcdef0"})
	t.Cleanup(srv.Close)
	_, err := Check(t.Context(), zap.NewNop(), dir, NewClient(srv.URL), false)
	if err == nil {
		t.Fatal("Check with an unreadable marker: want an error")
	}
	if want := filepath.Join(dir, MarkerName); !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not name the marker %s", err, want)
	}
}

func TestStateDir(t *testing.T) { // not parallel: t.Setenv
	for _, tc := range []struct{ env, want string }{
		{"", DefaultStateDir},
		{"/var/lib/prepull:/var/lib/node_exporter/textfile_collector", "/var/lib/prepull"},
		{"/srv/state", "/srv/state"},
	} {
		t.Setenv("STATE_DIRECTORY", tc.env)
		if got := StateDir(); got != tc.want {
			t.Errorf("STATE_DIRECTORY=%q: StateDir() = %q, want %q", tc.env, got, tc.want)
		}
	}
}
