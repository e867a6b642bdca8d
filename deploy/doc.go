// Package deploy holds no code. Its directories are what a platform team
// copies to run prepull: imagebuilder/ (an EC2 Image Builder component),
// packer/ (provisioners for an amazon-ebs build), kubernetes/ (a DaemonSet
// for clusters that cannot rebuild AMIs) and examples/ (manifests). Its tests
// parse every file into the types of the system that consumes it and run the
// build scripts against a real containerd and registry.
package deploy
