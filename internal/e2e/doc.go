// Package e2e holds end-to-end tests that run prepull the way a cluster
// does, through the CRI of a real containerd that the test harness starts
// with runc: the DaemonSet of deploy/kubernetes as kubelet would run it,
// containers that start from pre-pulled images with the registry gone, and
// the real kubelet running a static pod from them and garbage-collecting
// images. It has no code of its own; the tests need root (overlayfs, runc).
package e2e
