package warmup

import (
	"context"
	"fmt"
	"path"
	"strings"

	containerd "github.com/containerd/containerd/v2/client"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"go.uber.org/zap"
)

// Image is an image present in containerd, to warm.
type Image struct {
	// Name identifies the image in logs and Stats (the manifest's reference).
	Name string
	// Image is the containerd image, resolved for the platform it was
	// pulled for.
	Image containerd.Image
	// Priority are paths inside the image read before anything else; nil
	// means the image's entrypoint (EntrypointPaths).
	Priority []string
}

// WarmImages warms images as unpacked for snapshotter, all at once on the
// Warmer's pool (WarmAll): it takes a read-only view of each image
// (SnapshotDirs), warms their directories, and removes the views once every
// image is done. ctx must carry the containerd namespace. A failure is the
// image's own; the others go on. Outcomes are in the order of imgs, each
// named by its Stats.Image.
func (w *Warmer) WarmImages(ctx context.Context, client *containerd.Client, snapshotter string, imgs []Image) []Outcome {
	out := make([]Outcome, len(imgs))
	var targets []Target
	var slot []int // targets[i]'s index in out
	for i, img := range imgs {
		out[i] = Outcome{Stats: Stats{Image: img.Name}}
		if err := ctx.Err(); err != nil {
			out[i].Err = fmt.Errorf("warm %s: %w", img.Name, err)
			continue
		}
		dirs, cleanup, err := SnapshotDirs(ctx, client, snapshotter, img.Image)
		if err != nil {
			out[i].Err = fmt.Errorf("warm %s: %w", img.Name, err)
			continue
		}
		defer func() {
			if err := cleanup(context.WithoutCancel(ctx)); err != nil {
				w.log.Warn("remove warm-up view", zap.String("image", img.Name), zap.Error(err))
			}
		}()
		prio := img.Priority
		if len(prio) == 0 {
			if spec, err := img.Image.Spec(ctx); err == nil {
				prio = EntrypointPaths(spec.Config)
			}
		}
		targets = append(targets, Target{Name: img.Name, Dirs: dirs, Priority: prio})
		slot = append(slot, i)
	}
	for i, o := range w.WarmAll(ctx, targets) {
		out[slot[i]] = o // o.Err names the image already, as Warm's does
	}
	for _, o := range out {
		if o.Err != nil {
			w.log.Error("image not warmed", zap.String("image", o.Stats.Image), zap.Error(o.Err),
				zap.Int64("files", o.Stats.Files), zap.Int64("bytes", o.Stats.Bytes))
		}
	}
	return out
}

// EntrypointPaths turns an image config into the paths its first argument
// (entrypoint, else cmd) may name: the first file a container start reads.
// An absolute path is itself, a path with a slash is relative to the working
// directory, and a bare name is looked up in each directory of the image's
// PATH (the warm-up reads the ones that exist).
func EntrypointPaths(cfg ocispec.ImageConfig) []string {
	argv := append(append([]string{}, cfg.Entrypoint...), cfg.Cmd...)
	if len(argv) == 0 || argv[0] == "" {
		return nil
	}
	bin := argv[0]
	if strings.HasPrefix(bin, "/") {
		return []string{path.Clean(bin)}
	}
	if strings.Contains(bin, "/") {
		wd := cfg.WorkingDir
		if wd == "" {
			wd = "/"
		}
		return []string{path.Join(wd, bin)}
	}
	pathEnv := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, e := range cfg.Env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			pathEnv = v
		}
	}
	var out []string
	for _, d := range strings.Split(pathEnv, ":") {
		if strings.HasPrefix(d, "/") {
			out = append(out, path.Join(d, bin))
		}
	}
	return out
}
