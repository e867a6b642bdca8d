package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"google.golang.org/grpc"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// CRIInfo is what prepull learns from the CRI plugin about how kubelet's
// images are stored.
type CRIInfo struct {
	// Snapshotter is the snapshotter the CRI unpacks images into for pods of
	// the default runtime; empty when it could not be told.
	Snapshotter string
	// Source says where Snapshotter came from, for the log.
	Source string
	// DiscardUnpackedLayers mirrors the CRI's discard_unpacked_layers where
	// the CRI reports it (containerd 1.7 does; 2.x keeps it out of Status).
	DiscardUnpackedLayers bool
	// ImageFS is the directory the CRI reports as its image file system
	// (the default snapshotter's root), empty when unknown.
	ImageFS string
}

// criConfig is the part of the CRI Status "config" we read. containerd 1.7
// puts snapshotter under containerd; 2.x moved the image snapshotter out of it
// but keeps per-runtime snapshotters.
type criConfig struct {
	Containerd struct {
		Snapshotter           string `json:"snapshotter"`
		DiscardUnpackedLayers bool   `json:"discardUnpackedLayers"`
		DefaultRuntimeName    string `json:"defaultRuntimeName"`
		Runtimes              map[string]struct {
			Snapshotter string `json:"snapshotter"`
		} `json:"runtimes"`
	} `json:"containerd"`
}

// DetectCRI asks the CRI plugin on conn which snapshotter it unpacks into:
// first the default runtime's snapshotter from the verbose Status config,
// then the global one (1.7), then the image filesystem the CRI reports first
// (its default snapshotter's root, io.containerd.snapshotter.v1.<name>).
func DetectCRI(ctx context.Context, conn *grpc.ClientConn) (CRIInfo, error) {
	var info CRIInfo
	var errs []error
	rs := runtimeapi.NewRuntimeServiceClient(conn)
	st, err := rs.Status(ctx, &runtimeapi.StatusRequest{Verbose: true})
	if err != nil {
		errs = append(errs, fmt.Errorf("cri status: %w", err))
	} else if raw := st.GetInfo()["config"]; raw != "" {
		var c criConfig
		if err := json.Unmarshal([]byte(raw), &c); err != nil {
			errs = append(errs, fmt.Errorf("cri status config: %w", err))
		} else {
			info.DiscardUnpackedLayers = c.Containerd.DiscardUnpackedLayers
			if rt, ok := c.Containerd.Runtimes[c.Containerd.DefaultRuntimeName]; ok && rt.Snapshotter != "" {
				info.Snapshotter, info.Source = rt.Snapshotter, "cri runtime "+c.Containerd.DefaultRuntimeName
			} else if c.Containerd.Snapshotter != "" {
				info.Snapshotter, info.Source = c.Containerd.Snapshotter, "cri config"
			}
		}
	}
	is := runtimeapi.NewImageServiceClient(conn)
	fs, err := is.ImageFsInfo(ctx, &runtimeapi.ImageFsInfoRequest{})
	if err != nil {
		if info.Snapshotter != "" {
			return info, nil // the image file system only helps sync
		}
		errs = append(errs, fmt.Errorf("cri imagefs info: %w", err))
		return info, errors.Join(errs...)
	}
	if f := fs.GetImageFilesystems(); len(f) > 0 {
		info.ImageFS = f[0].GetFsId().GetMountpoint()
	}
	if info.Snapshotter != "" {
		return info, nil
	}
	for _, f := range fs.GetImageFilesystems() {
		base := filepath.Base(f.GetFsId().GetMountpoint())
		if name, ok := strings.CutPrefix(base, "io.containerd.snapshotter.v1."); ok && name != "" {
			info.Snapshotter, info.Source = name, "cri image filesystem"
			return info, nil
		}
		errs = append(errs, fmt.Errorf("cri image filesystem %q is not a snapshotter root", f.GetFsId().GetMountpoint()))
		break
	}
	return info, errors.Join(errs...)
}
