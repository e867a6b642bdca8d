package ecrauth

import (
	"net"
	"strconv"
	"strings"
)

// Partition names as the AWS SDK spells them.
const (
	PartitionAWS      = "aws"
	PartitionChina    = "aws-cn"
	PartitionGovCloud = "aws-us-gov"
	PartitionISO      = "aws-iso"
	PartitionISOB     = "aws-iso-b"
	PartitionISOE     = "aws-iso-e"
	PartitionISOF     = "aws-iso-f"
	PartitionEUSC     = "aws-eusc"
)

// Host names of ECR Public. Its tokens always come from us-east-1.
const (
	PublicHost          = "public.ecr.aws"
	PublicDualStackHost = "ecr-public.aws.com"
	publicRegion        = "us-east-1"
)

// Registry describes an Amazon ECR registry host.
type Registry struct {
	// Host is the host as given (lower-cased), including a port if one was given.
	Host string
	// AccountID is the 12-digit registry id; empty for ECR Public.
	AccountID string
	// Region is the AWS region the registry lives in (us-east-1 for ECR Public).
	Region string
	// Partition is the AWS partition, e.g. "aws", "aws-cn", "aws-us-gov".
	Partition string
	// FIPS reports a FIPS host (dkr.ecr-fips / dkr-ecr-fips).
	FIPS bool
	// DualStack reports an IPv4+IPv6 host (dkr-ecr.<region>.on.aws, ecr-public.aws.com).
	DualStack bool
	// Public reports ECR Public.
	Public bool
}

// domain is a registry DNS suffix and the partitions whose regions may use it.
type domain struct {
	suffix     string
	dualStack  bool
	partitions []string
}

// privateDomains lists the registry suffixes (after "<region>.") of every
// partition. Only AWS-owned suffixes appear here: a host that matches gets an
// ECR token, so a guess would leak credentials to a stranger's host.
var privateDomains = []domain{
	{suffix: "amazonaws.com", partitions: []string{PartitionAWS, PartitionGovCloud}},
	{suffix: "amazonaws.com.cn", partitions: []string{PartitionChina}},
	{suffix: "amazonaws.eu", partitions: []string{PartitionEUSC}},
	{suffix: "c2s.ic.gov", partitions: []string{PartitionISO}},
	{suffix: "sc2s.sgov.gov", partitions: []string{PartitionISOB}},
	{suffix: "cloud.adc-e.uk", partitions: []string{PartitionISOE}},
	{suffix: "csp.hci.ic.gov", partitions: []string{PartitionISOF}},
	{suffix: "on.aws", dualStack: true, partitions: []string{PartitionAWS, PartitionGovCloud}},
	{suffix: "on.amazonwebservices.com.cn", dualStack: true, partitions: []string{PartitionChina}},
}

// regionPrefixes maps region name prefixes to their partition; every other
// well-formed region is in the commercial partition. Longest prefixes first.
var regionPrefixes = []struct{ prefix, partition string }{
	{"us-isob-", PartitionISOB},
	{"us-isof-", PartitionISOF},
	{"us-iso-", PartitionISO},
	{"eu-isoe-", PartitionISOE},
	{"us-gov-", PartitionGovCloud},
	{"eusc-", PartitionEUSC},
	{"cn-", PartitionChina},
}

// ParseHost reports whether host (optionally host:port) is an Amazon ECR
// registry and, if so, which one. It accepts only exact ECR shapes:
// look-alikes such as "1234.dkr.ecr.us-west-2.amazonaws.com.evil.com" or
// 11-digit accounts are not ECR.
func ParseHost(host string) (Registry, bool) {
	if len(host) == 0 || len(host) > 253+6 {
		return Registry{}, false
	}
	host = strings.ToLower(host)
	name := host
	if strings.ContainsRune(host, ':') {
		h, port, err := net.SplitHostPort(host)
		if err != nil || !validPort(port) {
			return Registry{}, false
		}
		name = h
	}

	switch name {
	case PublicHost, PublicDualStackHost:
		return Registry{
			Host:      host,
			Region:    publicRegion,
			Partition: PartitionAWS,
			DualStack: name == PublicDualStackHost,
			Public:    true,
		}, true
	}

	// <account>.dkr.ecr[-fips].<region>.<suffix> or
	// <account>.dkr-ecr[-fips].<region>.<dual-stack suffix>
	labels := strings.Split(name, ".")
	if len(labels) < 5 || !isAccountID(labels[0]) {
		return Registry{}, false
	}
	var (
		fips, dualStack bool
		region, suffix  string
	)
	switch {
	case labels[1] == "dkr" && (labels[2] == "ecr" || labels[2] == "ecr-fips"):
		fips = labels[2] == "ecr-fips"
		region, suffix = labels[3], strings.Join(labels[4:], ".")
	case labels[1] == "dkr-ecr" || labels[1] == "dkr-ecr-fips":
		fips, dualStack = labels[1] == "dkr-ecr-fips", true
		region, suffix = labels[2], strings.Join(labels[3:], ".")
	default:
		return Registry{}, false
	}
	var d *domain
	for i := range privateDomains {
		if privateDomains[i].suffix == suffix && privateDomains[i].dualStack == dualStack {
			d = &privateDomains[i]
			break
		}
	}
	if d == nil {
		return Registry{}, false
	}

	partition, ok := regionPartition(region)
	if !ok || !contains(d.partitions, partition) {
		return Registry{}, false
	}
	return Registry{
		Host:      host,
		AccountID: labels[0],
		Region:    region,
		Partition: partition,
		FIPS:      fips,
		DualStack: dualStack,
	}, true
}

// regionPartition validates the shape of an AWS region name
// (<letters>(-<letters>)+-<digits>) and returns its partition.
func regionPartition(region string) (string, bool) {
	parts := strings.Split(region, "-")
	if len(parts) < 3 || len(region) > 32 {
		return "", false
	}
	for i, p := range parts {
		if p == "" {
			return "", false
		}
		last := i == len(parts)-1
		for _, c := range []byte(p) {
			switch {
			case last && c >= '0' && c <= '9':
			case !last && c >= 'a' && c <= 'z':
			default:
				return "", false
			}
		}
	}
	if len(parts[len(parts)-1]) > 2 {
		return "", false
	}
	for _, rp := range regionPrefixes {
		if strings.HasPrefix(region, rp.prefix) {
			return rp.partition, true
		}
	}
	return PartitionAWS, true
}

func isAccountID(s string) bool {
	if len(s) != 12 {
		return false
	}
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

func validPort(p string) bool {
	if p == "" || len(p) > 5 || p[0] == '+' || p[0] == '-' {
		return false
	}
	n, err := strconv.Atoi(p)
	return err == nil && n > 0 && n <= 65535
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// cacheKey identifies the token a registry needs. A private ECR token is valid
// for every registry the caller may read in one region, so the key is the
// partition and region (the API's registryIds parameter is deprecated and not
// needed); FIPS hosts get their own key because their token must come from the
// FIPS API endpoint. ECR Public has a single key.
func (r Registry) cacheKey() string {
	if r.Public {
		return "ecr-public"
	}
	k := r.Partition + "/" + r.Region
	if r.FIPS {
		k += "/fips"
	}
	return k
}
