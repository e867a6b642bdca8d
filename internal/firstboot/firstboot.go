// Package firstboot decides whether a boot is the first one of an EC2 instance,
// so that the boot unit warms the images once per instance and not on every
// reboot.
//
// systemd's ConditionFirstBoot= does not fire on EKS AMIs (their clean-up
// leaves an empty /etc/machine-id that the AMI build already committed), so the
// identity of the instance comes from IMDSv2 instead: the instance-id is
// compared with a marker file in the unit's StateDirectory. The marker is
// written only after a successful run, so a failed warm-up is retried at the
// next boot.
package firstboot

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
	"go.uber.org/zap"
)

// MarkerName is the file in the state directory that records the instance-id
// of the last successful run.
const MarkerName = "instance-id"

// DefaultStateDir is where systemd's StateDirectory=prepull puts the marker.
const DefaultStateDir = "/var/lib/prepull"

// StateDir returns the directory for the marker: the first entry of
// $STATE_DIRECTORY, which systemd sets from StateDirectory= (the units list
// prepull first), else DefaultStateDir.
func StateDir() string {
	if v, _, _ := strings.Cut(os.Getenv("STATE_DIRECTORY"), ":"); v != "" {
		return v
	}
	return DefaultStateDir
}

// lookupTimeout bounds the whole IMDS exchange (token, then instance-id). The
// SDK client already fails fast (250 ms dial, 500 ms response header, three
// attempts); this is the outer bound for a slow but reachable endpoint.
const lookupTimeout = 10 * time.Second

// MetadataAPI is the one IMDS call Check needs.
type MetadataAPI interface {
	// GetMetadata returns the metadata document at params.Path, fetching an
	// IMDSv2 session token first.
	GetMetadata(ctx context.Context, params *imds.GetMetadataInput, optFns ...func(*imds.Options)) (*imds.GetMetadataOutput, error)
}

var _ MetadataAPI = (*imds.Client)(nil)

// NewClient returns an IMDS client that speaks IMDSv2 only (no fallback to the
// unauthenticated IMDSv1 flow). An empty endpoint means the SDK's default:
// AWS_EC2_METADATA_SERVICE_ENDPOINT if set, else http://169.254.169.254.
func NewClient(endpoint string) *imds.Client {
	return imds.New(imds.Options{
		Endpoint:       endpoint,
		EnableFallback: aws.FalseTernary,
	})
}

// Reason says why a Decision was taken.
type Reason string

// The reasons Check gives.
const (
	// NewInstance: no marker, or a marker with another instance-id (the AMI
	// build instance, or the instance this volume was snapshotted from).
	NewInstance Reason = "new-instance"
	// SameInstance: the marker names this instance; a reboot.
	SameInstance Reason = "same-instance"
	// Forced: the caller asked to run regardless of the marker.
	Forced Reason = "forced"
	// IMDSUnavailable: the instance-id could not be read. Check then runs:
	// a warm-up of an already warm disk costs one pass of reads, while a
	// skipped first-boot warm-up leaves the first pods to fetch every block
	// from S3 lazily; and off EC2 (on-premises nodes, tests) there is no
	// instance identity to remember, so every boot is treated as new.
	IMDSUnavailable Reason = "imds-unavailable"
)

// Decision is the outcome of Check.
type Decision struct {
	// Run is true when this boot should warm.
	Run bool
	// Reason explains Run.
	Reason Reason
	// InstanceID is this instance's id; empty when IMDS was unavailable.
	InstanceID string
	// Previous is the id in the marker; empty when there was none.
	Previous string
	// LookupErr is the IMDS error when Reason is IMDSUnavailable.
	LookupErr error
}

// Check reads this instance's id from IMDS and compares it with the marker in
// stateDir. With force it runs whatever the marker says (the id is still read
// so that MarkDone records it). It returns an error only when the marker
// exists but cannot be read: guessing then could warm on every boot or never.
func Check(ctx context.Context, log *zap.Logger, stateDir string, api MetadataAPI, force bool) (Decision, error) {
	log = log.Named("firstboot")
	marker := filepath.Join(stateDir, MarkerName)
	prev, err := readMarker(marker)
	if err != nil {
		return Decision{}, err
	}
	d := Decision{Previous: prev}
	id, err := instanceID(ctx, api)
	switch {
	case err != nil:
		d.Run, d.Reason, d.LookupErr = true, IMDSUnavailable, err
		if force {
			d.Reason = Forced
		}
		log.Warn("instance identity unavailable from IMDS; running as on a first boot",
			zap.String("marker", marker), zap.Error(err))
		return d, nil
	case force:
		d.Run, d.Reason = true, Forced
	case prev == id:
		d.Run, d.Reason = false, SameInstance
	default:
		d.Run, d.Reason = true, NewInstance
	}
	d.InstanceID = id
	return d, nil
}

// MarkDone records d's instance-id in stateDir after a successful run, so the
// next boot of the same instance skips. Without an instance-id (IMDS was
// unavailable) there is nothing to record and it does nothing.
func MarkDone(stateDir string, d Decision) error {
	if d.InstanceID == "" {
		return nil
	}
	marker := filepath.Join(stateDir, MarkerName)
	if err := os.MkdirAll(stateDir, 0o755); err != nil {
		return fmt.Errorf("create state dir %s: %w", stateDir, err)
	}
	tmp, err := os.CreateTemp(stateDir, "."+MarkerName+".*")
	if err != nil {
		return fmt.Errorf("write marker %s: %w", marker, err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if _, err := tmp.WriteString(d.InstanceID + "\n"); err != nil {
		tmp.Close()
		return fmt.Errorf("write marker %s: %w", marker, err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return fmt.Errorf("write marker %s: %w", marker, err)
	}
	// The marker must survive a power cut right after the run: a lost marker
	// only costs a warm-up, but a torn one could never match again.
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("write marker %s: %w", marker, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write marker %s: %w", marker, err)
	}
	if err := os.Rename(tmp.Name(), marker); err != nil {
		return fmt.Errorf("write marker %s: %w", marker, err)
	}
	return nil
}

func readMarker(path string) (string, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read marker %s: %w", path, err)
	}
	return strings.TrimSpace(string(b)), nil
}

func instanceID(ctx context.Context, api MetadataAPI) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, lookupTimeout)
	defer cancel()
	out, err := api.GetMetadata(ctx, &imds.GetMetadataInput{Path: "instance-id"})
	if err != nil {
		return "", fmt.Errorf("imds get instance-id: %w", err)
	}
	defer out.Content.Close()
	b, err := io.ReadAll(io.LimitReader(out.Content, 256))
	if err != nil {
		return "", fmt.Errorf("imds read instance-id: %w", err)
	}
	id := strings.TrimSpace(string(b))
	if id == "" {
		return "", errors.New("imds get instance-id: empty answer")
	}
	return id, nil
}
