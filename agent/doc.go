// Package agent pulls the images of a prepull manifest into containerd so that
// kubelet finds them ready: image records for tag, digest and config id,
// labelled and pinned the way the CRI plugin labels its own pulls, unpacked for
// the snapshotter the CRI plugin uses. It also reports what is on the node.
package agent
