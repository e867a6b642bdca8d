package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"text/template"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"sigs.k8s.io/yaml"

	"github.com/prepull/prepull/internal/harness"
)

// TestKubeletRunsPrepulledImages runs the real kubelet, standalone, on the
// harness containerd. After `prepull pull` and with the registry stopped, a
// static pod's containers named by tag and by digest run and print their
// words, which needs every image (the pause image too) to be found by the
// CRI without a pull. Then kubelet's image GC, forced by a 1 % high
// threshold, removes the image prepull pulled with pin: false and keeps the
// pinned ones, the unused one included.
//
// Kubelet runs its image GC when it starts and then every 5 minutes
// (ImageGCPeriod, a constant, no flag). The start-up pass fails ("invalid
// capacity 0 on image filesystem": cAdvisor has no filesystem stats yet), so
// the test waits for the second pass: about 5 minutes, up to 8.
func TestKubeletRunsPrepulledImages(t *testing.T) {
	needRoot(t)
	t.Parallel()
	ctx := t.Context()
	kubeletBin, err := harness.FindBinary("kubelet")
	if err != nil {
		t.Fatalf("%v (make kubelet-dep builds it)", err)
	}
	n := startNode(t)

	// The workload is the pause binary run as `pause echo WORDS`, plus a
	// file so its layers differ from the sandbox image's; keep and tool are
	// images no pod uses, pinned and not.
	pause, err := harness.PauseImage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	layers, err := pause.Layers()
	if err != nil {
		t.Fatal(err)
	}
	// push pushes an image of a layer of seeded random files, on top of
	// the pause binary's layer when runnable.
	push := func(repoTag string, seed uint64, runnable bool) string {
		t.Helper()
		extra, err := harness.Layer(harness.RandomFiles("data", 2, 8<<10, seed), true)
		if err != nil {
			t.Fatal(err)
		}
		spec := harness.ImageSpec{Layers: []v1.Layer{extra}, OCI: true, OS: "linux", Arch: harnessArch()}
		if runnable {
			spec.Layers = append(append([]v1.Layer{}, layers...), extra)
			spec.Entrypoint = []string{"/pause"}
		}
		img, err := harness.Image(spec)
		if err != nil {
			t.Fatal(err)
		}
		d, err := n.pusher.Push(ctx, repoTag, img)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	appDigest := push("kubelet/app:1", 41, true)
	push("kubelet/keep:1", 42, false)
	push("kubelet/tool:1", 43, false)
	byTag := n.reg.Host + "/kubelet/app:1"
	byDigest := n.reg.Host + "/kubelet/app@" + appDigest
	keep := n.reg.Host + "/kubelet/keep:1"
	tool := n.reg.Host + "/kubelet/tool:1"

	// startNode pulled the pause image through the CRI; prepull brings it.
	if _, err := n.is.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: n.pause}}); err != nil {
		t.Fatalf("CRI RemoveImage %s: %v", n.pause, err)
	}
	if img, err := n.ctrd.WaitCRIImage(ctx, n.pause, false, time.Minute); err != nil || img != nil {
		t.Fatalf("pause image after CRI RemoveImage: %v, %v; want it gone", img, err)
	}
	manifest := filepath.Join(t.TempDir(), "manifest.yaml")
	if err := os.WriteFile(manifest, fmt.Appendf(nil, "images:\n  - ref: %s\n  - ref: %s\n  - ref: %s\n  - ref: %s\n    pin: false\n", n.pause, byTag, keep, tool), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, prepullBinary(t), "pull", "--manifest", manifest,
		"--containerd-address", n.ctrd.Address, "--hosts-dir", n.hostsDir, "--log-format", "json")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("prepull pull: %v\n%s", err, out)
	}
	pinned := []string{n.pause, byTag, byDigest, keep}
	for _, ref := range pinned {
		if img := n.imageStatus(t, ref); img == nil || !img.GetPinned() {
			t.Fatalf("after prepull pull: CRI ImageStatus %s = %v; want present and pinned", ref, img)
		}
	}
	toolImg := n.imageStatus(t, tool)
	if toolImg == nil || toolImg.GetPinned() {
		t.Fatalf("after prepull pull: CRI ImageStatus %s = %v; want present and not pinned", tool, toolImg)
	}

	n.reg.Stop()
	if resp, err := (&http.Client{Timeout: 2 * time.Second}).Get("http://" + n.reg.Host + "/v2/"); err == nil {
		resp.Body.Close()
		t.Fatalf("registry %s still answers after Stop", n.reg.Host)
	}

	k := startKubelet(t, n, kubeletBin, []corev1.Container{
		{Name: "by-tag", Image: byTag, Args: []string{"echo", "started-by-tag"}, ImagePullPolicy: corev1.PullIfNotPresent},
		{Name: "by-digest", Image: byDigest, Args: []string{"echo", "started-by-digest"}, ImagePullPolicy: corev1.PullIfNotPresent},
	})

	for _, c := range []struct{ name, word string }{{"by-tag", "started-by-tag"}, {"by-digest", "started-by-digest"}} {
		var st *runtimeapi.ContainerStatus
		waitFor(t, "kubelet to run container "+c.name, 5*time.Minute, k.check, func() bool {
			st = n.kubeletContainer(t, c.name)
			return st.GetState() == runtimeapi.ContainerState_CONTAINER_EXITED
		})
		logText, err := harness.CRILogText(st.GetLogPath())
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: CRI ContainerStatus: state %s exit %d image %s (%s); log %s: %q", c.name, st.GetState(), st.GetExitCode(), st.GetImage().GetImage(), st.GetImageRef(), st.GetLogPath(), logText)
		if st.GetExitCode() != 0 || strings.TrimSpace(logText) != c.word {
			t.Errorf("%s: exit code %d, output %q; want 0 and %q", c.name, st.GetExitCode(), logText, c.word)
		}
		if st.GetImageRef() != byDigest {
			t.Errorf("%s: ran image %s; want %s", c.name, st.GetImageRef(), byDigest)
		}
	}

	// Image GC: the unpinned image goes; then, once the pass that removed it
	// has ended, every pinned image is still there.
	removed := regexp.MustCompile(`"Removing image to free bytes" imageID="([^"]+)"`)
	ended := regexp.MustCompile(`Image garbage collection (succeeded|failed)`)
	waitFor(t, "kubelet's image GC to remove "+tool, 8*time.Minute, k.check, func() bool {
		return n.imageStatus(t, tool) == nil
	})
	removal := `"Removing image to free bytes" imageID="` + toolImg.GetId() + `"`
	var gcLog string
	waitFor(t, "kubelet's log to show the removal of "+toolImg.GetId()+" and the end of that GC pass", 2*time.Minute, k.check, func() bool {
		gcLog = k.log()
		i := strings.Index(gcLog, removal)
		return i >= 0 && ended.MatchString(gcLog[i:])
	})
	for _, line := range strings.Split(gcLog, "\n") {
		if strings.Contains(line, "Image garbage collection") || removed.MatchString(line) {
			t.Logf("kubelet: %s", line)
		}
	}
	for _, ref := range pinned {
		img := n.imageStatus(t, ref)
		if img == nil || !img.GetPinned() {
			t.Errorf("after kubelet's image GC: CRI ImageStatus %s = %v; want present and pinned", ref, img)
		}
	}
}

// kubelet is a running standalone kubelet.
type kubelet struct {
	t       *testing.T
	cmd     *exec.Cmd
	done    chan error
	logPath string
}

var kubeletConfig = template.Must(template.New("kubelet").Parse(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
staticPodPath: {{.Dir}}/manifests
podLogsDir: {{.Dir}}/logs
containerRuntimeEndpoint: unix://{{.Socket}}
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
address: 127.0.0.1
port: {{.Port}}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {{.HealthzPort}}
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
fileCheckFrequency: 5s
imageGCHighThresholdPercent: 1
imageGCLowThresholdPercent: 0
imageMinimumGCAge: 0s
`))

// kernelTunables are the sysctls kubelet sets when it starts (it refuses to
// start if it cannot); the test puts the machine's values back.
var kernelTunables = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
}

// startKubelet writes a static pod of containers (host network, restart
// policy Never) and starts kubelet without an API server on n's CRI, with
// its root, logs and ports its own.
func startKubelet(t *testing.T, n *node, bin string, containers []corev1.Container) *kubelet {
	t.Helper()
	dir := filepath.Join(n.dir, "k")
	for _, d := range []string{"manifests", "logs", "root"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	pod := corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Name: "offline", Namespace: "prepull-e2e"},
		Spec: corev1.PodSpec{
			HostNetwork:   true,
			RestartPolicy: corev1.RestartPolicyNever,
			Containers:    containers,
		},
	}
	b, err := yaml.Marshal(pod)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "manifests", "offline.yaml"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	healthz := freePort(t)
	var cfg bytes.Buffer
	if err := kubeletConfig.Execute(&cfg, map[string]any{"Dir": dir, "Socket": n.ctrd.Address, "Port": freePort(t), "HealthzPort": healthz}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.yaml"), cfg.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}

	saved := map[string][]byte{}
	for _, s := range kernelTunables {
		if v, err := os.ReadFile(filepath.Join("/proc/sys", s)); err == nil {
			saved[s] = v
		}
	}
	t.Cleanup(func() {
		for s, v := range saved {
			if err := os.WriteFile(filepath.Join("/proc/sys", s), v, 0o644); err != nil {
				t.Logf("restore %s: %v", s, err)
			}
		}
	})

	k := &kubelet{t: t, done: make(chan error, 1), logPath: filepath.Join(dir, "kubelet.log")}
	logf, err := os.Create(k.logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	k.cmd = exec.Command(bin, "--config", filepath.Join(dir, "config.yaml"),
		"--root-dir", filepath.Join(dir, "root"), "--cert-dir", filepath.Join(dir, "pki"),
		"--hostname-override", "prepull-e2e", "--v", "4")
	k.cmd.Stdout, k.cmd.Stderr = logf, logf
	k.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := k.cmd.Start(); err != nil {
		t.Fatalf("start kubelet: %v", err)
	}
	go func() { k.done <- k.cmd.Wait() }()
	t.Cleanup(func() {
		k.stop()
		// kubelet leaves its pods to the runtime when it stops.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(t.Context()), 2*time.Minute)
		defer cancel()
		resp, err := n.rs.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
		if err != nil {
			t.Logf("CRI ListPodSandbox: %v", err)
			return
		}
		for _, s := range resp.GetItems() {
			if _, err := n.rs.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: s.GetId()}); err != nil {
				t.Logf("CRI StopPodSandbox %s: %v", s.GetId(), err)
			}
			if _, err := n.rs.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: s.GetId()}); err != nil {
				t.Logf("CRI RemovePodSandbox %s: %v", s.GetId(), err)
			}
		}
	})
	waitFor(t, "kubelet /healthz", 3*time.Minute, k.check, func() bool {
		return httpGet(fmt.Sprintf("http://127.0.0.1:%d/healthz", healthz)) == http.StatusOK
	})
	return k
}

// check ends the test if kubelet has exited.
func (k *kubelet) check() {
	k.t.Helper()
	select {
	case err := <-k.done:
		k.done <- err
		k.t.Fatalf("kubelet exited: %v\nkubelet log:\n%s", err, tail(k.logPath, 40))
	default:
	}
}

func (k *kubelet) log() string {
	b, err := os.ReadFile(k.logPath)
	if err != nil {
		k.t.Fatal(err)
	}
	return string(b)
}

func (k *kubelet) stop() {
	harness.StopGroup(k.cmd.Process.Pid, k.done, 30*time.Second)
}

// kubeletContainer is the CRI status of the static pod's container name, or
// nil before kubelet has created it.
func (n *node) kubeletContainer(t *testing.T, name string) *runtimeapi.ContainerStatus {
	t.Helper()
	resp, err := n.rs.ListContainers(t.Context(), &runtimeapi.ListContainersRequest{Filter: &runtimeapi.ContainerFilter{
		LabelSelector: map[string]string{"io.kubernetes.pod.namespace": "prepull-e2e", "io.kubernetes.container.name": name},
	}})
	if err != nil {
		t.Fatalf("CRI ListContainers: %v", err)
	}
	if len(resp.GetContainers()) == 0 {
		return nil
	}
	st, err := n.rs.ContainerStatus(t.Context(), &runtimeapi.ContainerStatusRequest{ContainerId: resp.GetContainers()[0].GetId()})
	if err != nil {
		t.Fatalf("CRI ContainerStatus %s: %v", name, err)
	}
	return st.GetStatus()
}
