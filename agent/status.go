package agent

import (
	"context"
	"fmt"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/errdefs"
	"github.com/prepull/prepull/manifest"
)

// Status is what the node holds for one manifest image.
type Status struct {
	Ref         string   `json:"ref"`
	Tag         string   `json:"tag,omitempty"`
	Platform    string   `json:"platform,omitempty"`
	Digest      string   `json:"digest,omitempty"`
	ID          string   `json:"id,omitempty"`
	Size        int64    `json:"size"`
	Present     bool     `json:"present"`
	Unpacked    bool     `json:"unpacked"`
	Pinned      bool     `json:"pinned"`
	WantPin     bool     `json:"wantPin"`
	Snapshotter string   `json:"snapshotter"`
	Ready       bool     `json:"ready"`
	Problems    []string `json:"problems,omitempty"`
}

// Inspect reports, for each image, whether kubelet would use it without a
// network pull: the tag, digest and id records exist and agree, carry the CRI
// labels (pinned where asked), and the image is unpacked for the snapshotter.
func (a *Agent) Inspect(ctx context.Context, imgs []manifest.Image) ([]Status, error) {
	ctx = a.ctx(ctx)
	sn := a.Snapshotter(ctx)
	out := make([]Status, 0, len(imgs))
	for _, img := range imgs {
		st, err := a.inspect(ctx, img, sn)
		if err != nil {
			return nil, err
		}
		out = append(out, st)
	}
	return out, nil
}

func (a *Agent) inspect(ctx context.Context, img manifest.Image, sn string) (Status, error) {
	st := Status{Ref: img.Ref, Tag: img.Tag, Platform: img.Platform, WantPin: img.Pin, Snapshotter: sn}
	is := a.client.ImageService()
	rec, err := is.Get(ctx, img.Ref)
	if errdefs.IsNotFound(err) {
		st.Problems = append(st.Problems, "not present")
		return st, nil
	} else if err != nil {
		return st, wrapUnavailable(fmt.Errorf("get image %s: %w", img.Ref, err))
	}
	st.Present = true
	st.Digest = rec.Target.Digest.String()
	image := containerd.NewImageWithPlatform(a.client, rec, a.platformMatcher(img))
	cfg, err := image.Config(ctx)
	if err != nil {
		st.Problems = append(st.Problems, fmt.Sprintf("manifest or config unreadable: %v", err))
		return st, nil
	}
	st.ID = cfg.Digest.String()
	if size, err := image.Size(ctx); err == nil {
		st.Size = size
	}
	names, err := recordNames(img, st.Digest, st.ID)
	if err != nil {
		return st, err
	}
	st.Pinned = true
	for _, name := range names {
		r, err := is.Get(ctx, name)
		if errdefs.IsNotFound(err) {
			st.Problems = append(st.Problems, "missing record "+name)
			st.Pinned = false
			continue
		} else if err != nil {
			return st, wrapUnavailable(fmt.Errorf("get image %s: %w", name, err))
		}
		if r.Target.Digest != rec.Target.Digest {
			st.Problems = append(st.Problems, fmt.Sprintf("record %s points at %s, not %s", name, r.Target.Digest, rec.Target.Digest))
		}
		if r.Labels[LabelManaged] != LabelManagedValue {
			st.Problems = append(st.Problems, fmt.Sprintf("record %s lacks %s=%s", name, LabelManaged, LabelManagedValue))
		}
		if r.Labels[LabelPinned] != LabelPinnedValue {
			st.Pinned = false
		}
	}
	if img.Pin && !st.Pinned {
		st.Problems = append(st.Problems, "not pinned")
	}
	unpacked, err := image.IsUnpacked(ctx, sn)
	if err != nil {
		st.Problems = append(st.Problems, fmt.Sprintf("unpack state for %s: %v", sn, err))
	}
	st.Unpacked = unpacked
	if !unpacked && err == nil {
		st.Problems = append(st.Problems, "not unpacked for snapshotter "+sn)
	}
	st.Ready = len(st.Problems) == 0
	return st, nil
}

// Unpin removes the pinned label (and prepull's owner label) from records
// prepull wrote that belong to none of keep, so kubelet's image GC may
// reclaim images a manifest no longer lists. It returns the record names it
// changed. Records of images in keep are left alone even when not ready.
func (a *Agent) Unpin(ctx context.Context, keep []Status) ([]string, error) {
	ctx = a.ctx(ctx)
	kept := map[string]bool{}
	for _, s := range keep {
		kept[s.Ref] = true
		// Missing parts (an image not present) name no record.
		names, _ := recordNames(manifest.Image{Ref: s.Ref, Tag: s.Tag}, s.Digest, s.ID)
		for _, n := range names {
			kept[n] = true
		}
	}
	recs, err := a.client.ImageService().List(ctx, fmt.Sprintf(`labels.%q==%s`, LabelOwner, LabelOwnerValue))
	if err != nil {
		return nil, wrapUnavailable(fmt.Errorf("list prepull records: %w", err))
	}
	var changed []string
	for _, r := range recs {
		if kept[r.Name] {
			continue
		}
		if err := a.disown(ctx, r); err != nil && !errdefs.IsNotFound(err) {
			return changed, wrapUnavailable(fmt.Errorf("unpin %s: %w", r.Name, err))
		}
		changed = append(changed, r.Name)
	}
	return changed, nil
}

// ContainerdImage returns the client image for img on the node, resolved
// for img's platform (or the node's).
func (a *Agent) ContainerdImage(ctx context.Context, img manifest.Image) (containerd.Image, error) {
	rec, err := a.client.ImageService().Get(a.ctx(ctx), img.Ref)
	if errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("image %s is not present (pull it first)", img.Ref)
	} else if err != nil {
		return nil, wrapUnavailable(fmt.Errorf("get image %s: %w", img.Ref, err))
	}
	return containerd.NewImageWithPlatform(a.client, rec, a.platformMatcher(img)), nil
}
