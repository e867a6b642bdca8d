package main

import (
	"testing"
	"time"
)

// TestRatiosJudgeDefaults checks that issue 15's targets are judged on the
// rows of prepull's defaults, not on a faster variant a user would have to
// ask for, with issue 15's thresholds.
func TestRatiosJudgeDefaults(t *testing.T) {
	s := func(v float64) time.Duration { return time.Duration(v * float64(time.Second)) }
	b := &bench{
		rows: []row{
			{Name: "ctr sequential", Wall: s(100)},
			{Name: "prepull defaults", Wall: s(46), Client: usage{MaxRSS: 50 << 20}},
			{Name: "prepull discard (as on EKS)", Wall: s(30), Client: usage{MaxRSS: 66 << 20}},
			{Name: "ideal: igzip|tar ×2 + sync", Wall: s(30)},
		},
		capped: []row{
			{Name: "capped: ctr [40 MiB/s per conn, 3ms]", Wall: s(24)},
			{Name: "capped: prepull defaults  [40 MiB/s per conn, 3ms]", Wall: s(8.1)},
			{Name: "capped: prepull discard (as on EKS) [40 MiB/s per conn, 3ms]", Wall: s(6)},
		},
	}
	want := map[string]struct {
		value string
		met   bool
	}{
		"cold set: prepull defaults / ctr sequential":                                    {"0.46×", false},
		"cold set: prepull defaults / ideal pipeline":                                    {"1.53×", true},
		"prepull peak RSS (max over runs)":                                               {"66.0 MiB", false},
		"capped link, big image: ctr / prepull defaults  [40 MiB/s per conn, 3ms], wall": {"2.96×", false},
	}
	got := b.ratios()
	if len(got) != len(want) {
		t.Fatalf("got %d targets, want %d: %+v", len(got), len(want), got)
	}
	for _, r := range got {
		w, ok := want[r.What]
		if !ok || r.Value != w.value || r.Met != w.met {
			t.Errorf("%s: %s (met %v), want %+v (listed: %v)", r.What, r.Value, r.Met, w, ok)
		}
	}
}
