package agent

import (
	"context"
	"fmt"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/errdefs"
	"github.com/prepull/prepull/manifest"
	"go.uber.org/zap"
)

// Labels the CRI plugin puts on the image records it manages.
const (
	LabelManaged      = "io.cri-containerd.image"
	LabelManagedValue = "managed"
	LabelPinned       = "io.cri-containerd.pinned"
	LabelPinnedValue  = "pinned"
	// LabelOwner marks records prepull wrote, so --prune-unlisted can find
	// the ones a manifest no longer lists.
	LabelOwner      = "prepull.io/managed"
	LabelOwnerValue = "true"
)

// writeRecords creates the tag, digest and id records for a pulled image.
// before gets the previous state of every record it touches.
func (a *Agent) writeRecords(ctx context.Context, img manifest.Image, image containerd.Image, labels map[string]string, before map[string]*images.Image, res *Result) error {
	target := image.Target()
	cfg, err := image.Config(ctx)
	if err != nil {
		return fmt.Errorf("read image config: %w", err)
	}
	res.Digest = target.Digest.String()
	res.ConfigID = cfg.Digest.String()
	names, err := recordNames(img, target.Digest.String(), res.ConfigID)
	if err != nil {
		return err
	}
	is := a.client.ImageService()
	for _, name := range names {
		if _, seen := before[name]; !seen {
			if prev, err := is.Get(ctx, name); err == nil {
				before[name] = &prev
			} else if errdefs.IsNotFound(err) {
				before[name] = nil
			} else {
				return wrapUnavailable(fmt.Errorf("get image %s: %w", name, err))
			}
		}
		l := labels
		if prev := before[name]; prev != nil && !img.Pin && foreignPin(prev.Labels) {
			// pin: false only takes back prepull's own pin: a record pinned
			// by someone else (the CRI's pinned_images, an AMI script) stays
			// pinned and is not marked as prepull's.
			l = map[string]string{LabelManaged: LabelManagedValue, LabelPinned: LabelPinnedValue}
		}
		if err := a.putRecord(ctx, name, image.Metadata(), l); err != nil {
			return wrapUnavailable(fmt.Errorf("create image record %s: %w", name, err))
		}
	}
	if tagName := tagRecord(img); tagName != "" {
		a.releaseOld(ctx, img, before[tagName], target.Digest.String())
	}
	return nil
}

// tagRecord is the name of img's tag record, "" for a digest-only entry.
func tagRecord(img manifest.Image) string {
	repo, tag, _, err := manifest.Split(img.Ref)
	if err != nil {
		return ""
	}
	if tag == "" {
		tag = img.Tag
	}
	if tag == "" {
		return ""
	}
	return repo + ":" + tag
}

// disown removes prepull's pin and owner label from rec, leaving its other
// labels: kubelet's image GC may then reclaim the image.
func (a *Agent) disown(ctx context.Context, rec images.Image) error {
	rec.Labels = map[string]string{}
	_, err := a.client.ImageService().Update(ctx, rec, "labels."+LabelPinned, "labels."+LabelOwner)
	return err
}

// foreignPin reports a record pinned by someone other than prepull.
func foreignPin(labels map[string]string) bool {
	return labels[LabelPinned] == LabelPinnedValue && labels[LabelOwner] != LabelOwnerValue
}

// releaseOld unpins the image a moved tag pointed at before, when prepull
// pinned it: otherwise its digest and id records would keep it pinned (and
// on disk, past kubelet's image GC) forever. Records someone else pinned
// are left alone. Best effort: a failure is logged.
func (a *Agent) releaseOld(ctx context.Context, img manifest.Image, prevTag *images.Image, newDigest string) {
	if prevTag == nil || prevTag.Target.Digest.String() == newDigest || prevTag.Labels[LabelOwner] != LabelOwnerValue {
		return
	}
	repo, _, _, err := manifest.Split(img.Ref)
	if err != nil {
		return
	}
	old := []string{repo + "@" + prevTag.Target.Digest.String()}
	if cfg, err := containerd.NewImageWithPlatform(a.client, *prevTag, a.platformMatcher(img)).Config(ctx); err == nil {
		old = append(old, cfg.Digest.String())
	}
	is := a.client.ImageService()
	for _, name := range old {
		rec, err := is.Get(ctx, name)
		if err != nil || rec.Labels[LabelOwner] != LabelOwnerValue || rec.Target.Digest.String() == newDigest {
			continue
		}
		if err := a.disown(ctx, rec); err != nil {
			a.log.Warn("unpin the image a moved tag left", zap.String("record", name), zap.Error(err))
			continue
		}
		a.log.Info("tag moved: unpinned the image it pointed at", zap.String("image", img.Ref), zap.String("record", name))
	}
}

// rollback restores the records in before: deletes the ones that did not
// exist, puts back the others, so a failed image leaves nothing that claims
// it is ready. Best effort: containerd may be the reason it failed.
func (a *Agent) rollback(ctx context.Context, before map[string]*images.Image) {
	is := a.client.ImageService()
	for name, prev := range before {
		var err error
		if prev == nil {
			err = is.Delete(ctx, name)
			if errdefs.IsNotFound(err) {
				err = nil
			}
		} else {
			_, err = is.Update(ctx, *prev, "target", "labels")
		}
		if err != nil {
			a.log.Warn("roll back image record", zap.String("record", name), zap.Error(err))
		}
	}
}

// recordNames are the image records a CRI pull leaves: the id, the tag (when
// the reference has one, or the manifest kept it from repo:tag@digest) and
// the digest reference.
func recordNames(img manifest.Image, targetDigest, configID string) ([]string, error) {
	repo, _, _, err := manifest.Split(img.Ref)
	if err != nil {
		return nil, err
	}
	names := []string{configID}
	if tag := tagRecord(img); tag != "" {
		names = append(names, tag)
	}
	return append(names, repo+"@"+targetDigest), nil
}

// putRecord creates or updates one image record pointing at the pulled
// target, with the CRI labels. pin:false removes a pinned label left by an
// earlier run.
func (a *Agent) putRecord(ctx context.Context, name string, pulled images.Image, labels map[string]string) error {
	is := a.client.ImageService()
	rec := images.Image{Name: name, Target: pulled.Target, Labels: labels}
	for {
		if _, err := is.Create(ctx, rec); err == nil {
			return nil
		} else if !errdefs.IsAlreadyExists(err) {
			return err
		}
		old, err := is.Get(ctx, name)
		if errdefs.IsNotFound(err) {
			continue // removed in between: create again
		} else if err != nil {
			return err
		}
		if old.Target.Digest == rec.Target.Digest &&
			old.Labels[LabelManaged] == labels[LabelManaged] &&
			old.Labels[LabelPinned] == labels[LabelPinned] &&
			old.Labels[LabelOwner] == labels[LabelOwner] {
			return nil
		}
		_, err = is.Update(ctx, rec, "target", "labels."+LabelManaged, "labels."+LabelPinned, "labels."+LabelOwner)
		if errdefs.IsNotFound(err) {
			continue
		}
		return err
	}
}

func criLabels(pin bool) map[string]string {
	l := map[string]string{LabelManaged: LabelManagedValue, LabelOwner: LabelOwnerValue}
	if pin {
		l[LabelPinned] = LabelPinnedValue
	}
	return l
}
