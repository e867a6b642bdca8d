package ecrauth

import (
	"strings"
	"testing"
)

func TestParseHost(t *testing.T) {
	t.Parallel()
	const acct = "123456789012"
	tests := []struct {
		name string
		host string
		want Registry
		ok   bool
	}{
		{name: "commercial", host: acct + ".dkr.ecr.us-west-2.amazonaws.com", ok: true,
			want: Registry{AccountID: acct, Region: "us-west-2", Partition: PartitionAWS}},
		{name: "upper case", host: acct + ".DKR.ECR.US-WEST-2.AMAZONAWS.COM", ok: true,
			want: Registry{AccountID: acct, Region: "us-west-2", Partition: PartitionAWS}},
		{name: "with port", host: acct + ".dkr.ecr.eu-central-1.amazonaws.com:443", ok: true,
			want: Registry{AccountID: acct, Region: "eu-central-1", Partition: PartitionAWS}},
		{name: "new region prefix", host: acct + ".dkr.ecr.mx-central-1.amazonaws.com", ok: true,
			want: Registry{AccountID: acct, Region: "mx-central-1", Partition: PartitionAWS}},
		{name: "fips", host: acct + ".dkr.ecr-fips.us-east-1.amazonaws.com", ok: true,
			want: Registry{AccountID: acct, Region: "us-east-1", Partition: PartitionAWS, FIPS: true}},
		{name: "govcloud", host: acct + ".dkr.ecr.us-gov-west-1.amazonaws.com", ok: true,
			want: Registry{AccountID: acct, Region: "us-gov-west-1", Partition: PartitionGovCloud}},
		{name: "govcloud fips", host: acct + ".dkr.ecr-fips.us-gov-east-1.amazonaws.com", ok: true,
			want: Registry{AccountID: acct, Region: "us-gov-east-1", Partition: PartitionGovCloud, FIPS: true}},
		{name: "china", host: acct + ".dkr.ecr.cn-north-1.amazonaws.com.cn", ok: true,
			want: Registry{AccountID: acct, Region: "cn-north-1", Partition: PartitionChina}},
		{name: "iso", host: acct + ".dkr.ecr.us-iso-east-1.c2s.ic.gov", ok: true,
			want: Registry{AccountID: acct, Region: "us-iso-east-1", Partition: PartitionISO}},
		{name: "iso-b", host: acct + ".dkr.ecr.us-isob-east-1.sc2s.sgov.gov", ok: true,
			want: Registry{AccountID: acct, Region: "us-isob-east-1", Partition: PartitionISOB}},
		{name: "iso-e", host: acct + ".dkr.ecr.eu-isoe-west-1.cloud.adc-e.uk", ok: true,
			want: Registry{AccountID: acct, Region: "eu-isoe-west-1", Partition: PartitionISOE}},
		{name: "iso-f", host: acct + ".dkr.ecr.us-isof-south-1.csp.hci.ic.gov", ok: true,
			want: Registry{AccountID: acct, Region: "us-isof-south-1", Partition: PartitionISOF}},
		{name: "eusc", host: acct + ".dkr.ecr.eusc-de-east-1.amazonaws.eu", ok: true,
			want: Registry{AccountID: acct, Region: "eusc-de-east-1", Partition: PartitionEUSC}},
		{name: "dual-stack", host: acct + ".dkr-ecr.us-west-2.on.aws", ok: true,
			want: Registry{AccountID: acct, Region: "us-west-2", Partition: PartitionAWS, DualStack: true}},
		{name: "dual-stack fips", host: acct + ".dkr-ecr-fips.us-east-2.on.aws", ok: true,
			want: Registry{AccountID: acct, Region: "us-east-2", Partition: PartitionAWS, DualStack: true, FIPS: true}},
		{name: "dual-stack govcloud", host: acct + ".dkr-ecr.us-gov-west-1.on.aws", ok: true,
			want: Registry{AccountID: acct, Region: "us-gov-west-1", Partition: PartitionGovCloud, DualStack: true}},
		{name: "dual-stack china", host: acct + ".dkr-ecr.cn-northwest-1.on.amazonwebservices.com.cn", ok: true,
			want: Registry{AccountID: acct, Region: "cn-northwest-1", Partition: PartitionChina, DualStack: true}},
		{name: "public", host: "public.ecr.aws", ok: true,
			want: Registry{Region: "us-east-1", Partition: PartitionAWS, Public: true}},
		{name: "public with port", host: "public.ecr.aws:443", ok: true,
			want: Registry{Region: "us-east-1", Partition: PartitionAWS, Public: true}},
		{name: "public dual-stack", host: "ecr-public.aws.com", ok: true,
			want: Registry{Region: "us-east-1", Partition: PartitionAWS, Public: true, DualStack: true}},

		{name: "look-alike suffix", host: acct + ".dkr.ecr.us-west-2.amazonaws.com.evil.com"},
		{name: "look-alike prefix", host: "evil." + acct + ".dkr.ecr.us-west-2.amazonaws.com"},
		{name: "look-alike dual-stack", host: acct + ".dkr-ecr.us-west-2.on.aws.evil.com"},
		{name: "11-digit account", host: "12345678901.dkr.ecr.us-west-2.amazonaws.com"},
		{name: "13-digit account", host: "1234567890123.dkr.ecr.us-west-2.amazonaws.com"},
		{name: "letters in account", host: "12345678901a.dkr.ecr.us-west-2.amazonaws.com"},
		{name: "no region", host: acct + ".dkr.ecr.amazonaws.com"},
		{name: "bad region", host: acct + ".dkr.ecr.uswest2.amazonaws.com"},
		{name: "region partition mismatch", host: acct + ".dkr.ecr.us-west-2.amazonaws.com.cn"},
		{name: "china region on commercial", host: acct + ".dkr.ecr.cn-north-1.amazonaws.com"},
		{name: "iso region on commercial", host: acct + ".dkr.ecr.us-iso-east-1.amazonaws.com"},
		{name: "dual-stack label with ipv4 suffix", host: acct + ".dkr-ecr.us-west-2.amazonaws.com"},
		{name: "ipv4 label with dual-stack suffix", host: acct + ".dkr.ecr.us-west-2.on.aws"},
		{name: "wrong service", host: acct + ".dkr.ecs.us-west-2.amazonaws.com"},
		{name: "api endpoint", host: "api.ecr.us-west-2.amazonaws.com"},
		{name: "public look-alike", host: "public.ecr.aws.evil.com"},
		{name: "public subdomain", host: "x.public.ecr.aws"},
		{name: "bad port", host: acct + ".dkr.ecr.us-west-2.amazonaws.com:0"},
		{name: "non-numeric port", host: acct + ".dkr.ecr.us-west-2.amazonaws.com:https"},
		{name: "empty port", host: acct + ".dkr.ecr.us-west-2.amazonaws.com:"},
		{name: "trailing dot", host: acct + ".dkr.ecr.us-west-2.amazonaws.com."},
		{name: "docker hub", host: "registry-1.docker.io"},
		{name: "loopback", host: "127.0.0.1:5000"},
		{name: "ipv6 literal", host: "[::1]:5000"},
		{name: "empty", host: ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, ok := ParseHost(tc.host)
			if ok != tc.ok {
				t.Fatalf("ParseHost(%q) ok = %v, want %v", tc.host, ok, tc.ok)
			}
			if !ok {
				if got != (Registry{}) {
					t.Errorf("ParseHost(%q) = %+v with ok=false, want zero Registry", tc.host, got)
				}
				return
			}
			tc.want.Host = strings.ToLower(tc.host)
			if got != tc.want {
				t.Errorf("ParseHost(%q) = %+v, want %+v", tc.host, got, tc.want)
			}
		})
	}
}

func TestRegistryCacheKey(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		a, b string
		same bool
	}{
		{name: "two accounts one region", a: "123456789012.dkr.ecr.us-west-2.amazonaws.com", b: "210987654321.dkr.ecr.us-west-2.amazonaws.com", same: true},
		{name: "dual-stack shares the token", a: "123456789012.dkr.ecr.us-west-2.amazonaws.com", b: "123456789012.dkr-ecr.us-west-2.on.aws", same: true},
		{name: "port does not matter", a: "123456789012.dkr.ecr.us-west-2.amazonaws.com", b: "123456789012.dkr.ecr.us-west-2.amazonaws.com:443", same: true},
		{name: "regions differ", a: "123456789012.dkr.ecr.us-west-2.amazonaws.com", b: "123456789012.dkr.ecr.eu-central-1.amazonaws.com"},
		{name: "fips differs", a: "123456789012.dkr.ecr.us-east-1.amazonaws.com", b: "123456789012.dkr.ecr-fips.us-east-1.amazonaws.com"},
		{name: "public differs", a: "public.ecr.aws", b: "123456789012.dkr.ecr.us-east-1.amazonaws.com"},
		{name: "public names share", a: "public.ecr.aws", b: "ecr-public.aws.com", same: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			a, okA := ParseHost(tc.a)
			b, okB := ParseHost(tc.b)
			if !okA || !okB {
				t.Fatalf("ParseHost: %q ok=%v, %q ok=%v", tc.a, okA, tc.b, okB)
			}
			if same := a.cacheKey() == b.cacheKey(); same != tc.same {
				t.Errorf("cacheKey(%q)=%q, cacheKey(%q)=%q: same=%v, want %v", tc.a, a.cacheKey(), tc.b, b.cacheKey(), same, tc.same)
			}
		})
	}
}

// FuzzParseHost checks that the parser never panics and that whatever it
// accepts is self-consistent: a 12-digit account (or ECR Public), a region of
// a known partition, and a host that parses again to the same Registry.
func FuzzParseHost(f *testing.F) {
	for _, s := range []string{
		"123456789012.dkr.ecr.us-west-2.amazonaws.com",
		"123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com:5000",
		"123456789012.dkr-ecr.eu-west-1.on.aws",
		"123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn",
		"public.ecr.aws",
		"123456789012.dkr.ecr.us-west-2.amazonaws.com.evil.com",
		"[::1]:80",
		"a:b:c",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, host string) {
		r, ok := ParseHost(host)
		if !ok {
			if r != (Registry{}) {
				t.Fatalf("ParseHost(%q) returned %+v with ok=false", host, r)
			}
			return
		}
		if r.Host != strings.ToLower(host) {
			t.Fatalf("ParseHost(%q).Host = %q", host, r.Host)
		}
		if r.Public {
			if r.AccountID != "" || r.Region != publicRegion {
				t.Fatalf("ParseHost(%q) = %+v: bad public registry", host, r)
			}
		} else if !isAccountID(r.AccountID) || !strings.Contains(r.Host, r.AccountID+".dkr") {
			t.Fatalf("ParseHost(%q) = %+v: bad account", host, r)
		}
		if p, ok := regionPartition(r.Region); !ok || p != r.Partition {
			t.Fatalf("ParseHost(%q) = %+v: region partition %q ok=%v", host, r, p, ok)
		}
		again, ok := ParseHost(r.Host)
		if !ok || again != r {
			t.Fatalf("ParseHost(%q) not stable: %+v then %+v", host, r, again)
		}
	})
}
