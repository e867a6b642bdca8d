package main

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
)

// ratio is one target of issue 15 (or issue 6's re-run target) with its measured value.
type ratio struct {
	What, Target string
	Value        string
	Met          bool
	Known        bool
}

func (b *bench) find(prefix string) *row {
	for i := range b.rows {
		if strings.HasPrefix(b.rows[i].Name, prefix) {
			return &b.rows[i]
		}
	}
	return nil
}

// bestPrepull is the fastest prepull row (any variant).
func (b *bench) bestPrepull(rows []row) *row {
	var best *row
	for i := range rows {
		r := &rows[i]
		if strings.Contains(r.Name, "prepull") && (best == nil || r.Wall < best.Wall) {
			best = r
		}
	}
	return best
}

// ratios judges issue 15's targets on the "prepull defaults" rows (what a
// user who passes no flag gets; any other prepull row when there is none,
// named in the line), and issue 6's re-run target. (Issue 6's share of
// prepull in the CPU of prepull + containerd no longer applies: prepull's
// applier does what containerd did.)
func (b *bench) ratios() []ratio {
	var out []ratio
	add := func(what, target string, ok bool, format string, args ...any) {
		out = append(out, ratio{What: what, Target: target, Value: fmt.Sprintf(format, args...), Met: ok, Known: true})
	}
	seq, ideal := b.find("ctr sequential"), b.find("ideal")
	if p := b.defaults(b.rows, "prepull defaults"); p != nil {
		if seq != nil {
			v := p.Wall.Seconds() / seq.Wall.Seconds()
			add("cold set: "+p.Name+" / ctr sequential", "≤ 0.45×", v <= 0.45, "%.2f×", v)
		}
		if ideal != nil {
			v := p.Wall.Seconds() / ideal.Wall.Seconds()
			add("cold set: "+p.Name+" / ideal pipeline", "≤ 1.60×", v <= 1.6, "%.2f×", v)
		}
	}
	var rss int64
	for _, r := range append(append([]row(nil), b.rows...), b.capped...) {
		if strings.Contains(r.Name, "prepull") {
			rss = max(rss, r.Client.MaxRSS)
		}
	}
	if rss > 0 {
		add("prepull peak RSS (max over runs)", "≤ 64 MiB", rss <= 64<<20, "%.1f MiB", mib(rss))
	}
	if b.rerun != nil {
		add(b.rerun.Name, "< 1 s", b.rerun.Wall < time.Second, "%.2f s", b.rerun.Wall.Seconds())
	}
	var cctr *row
	for i := range b.capped {
		if strings.HasPrefix(b.capped[i].Name, "capped: ctr [") {
			cctr = &b.capped[i]
		}
	}
	if cp := b.defaults(b.capped, "capped: prepull defaults"); cp != nil && cctr != nil {
		v := cctr.Wall.Seconds() / cp.Wall.Seconds()
		add("capped link, big image: ctr / "+strings.TrimPrefix(cp.Name, "capped: ")+", wall", "≥ 3×", v >= 3, "%.2f×", v)
	}
	return out
}

// defaults is the row named with prefix, else the fastest prepull row.
func (b *bench) defaults(rows []row, prefix string) *row {
	for i := range rows {
		if strings.HasPrefix(rows[i].Name, prefix) {
			return &rows[i]
		}
	}
	return b.bestPrepull(rows)
}

func (b *bench) report(w io.Writer, total time.Duration) {
	fmt.Fprintln(w)
	c, r, e := b.set.totals()
	fmt.Fprintf(w, "image set: %d images, %d unique layers, %.0f MiB compressed, %.0f MiB unpacked, %d tar entries; big layer %.0f MiB gzip\n",
		len(b.set.Images), len(b.set.Unique), mib(c), mib(r), e, mib(b.set.Big().Layers[0].meta.Size))
	for _, t := range []struct {
		title string
		rows  []row
	}{{"cold pull of the set", b.rows}, {"capped link, big image only", b.capped}} {
		if len(t.rows) == 0 {
			continue
		}
		fmt.Fprintf(w, "\n%s\n", t.title)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "SCENARIO\tWALL s\tSYNC s\tDL s\tCLIENT CPU s\tCTRD CPU s\t(DECOMP s)\tWRITTEN MiB\tDISK MiB\tCLIENT RSS MiB\t")
		for _, x := range t.rows {
			dl := "-"
			if x.Download > 0 {
				dl = fmt.Sprintf("%.1f", x.Download.Seconds())
			}
			fmt.Fprintf(tw, "%s\t%.1f\t%.1f\t%s\t%.1f\t%.1f\t%.1f\t%.0f\t%.0f\t%.1f\t\n", x.Name, x.Wall.Seconds(), x.Sync.Seconds(), dl,
				x.Client.CPU.Seconds(), x.CtrdCPU.Seconds(), x.CtrdChild.Seconds(), mib(x.written()), mib(x.Disk), mib(x.Client.MaxRSS))
		}
		tw.Flush()
	}
	if b.rerun != nil {
		fmt.Fprintf(w, "\n%s: %.2fs, client CPU %.2fs\n", b.rerun.Name, b.rerun.Wall.Seconds(), b.rerun.Client.CPU.Seconds())
	}
	fmt.Fprintln(w, "\ntargets (issue 15, prepull's defaults)")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, x := range b.ratios() {
		met := "MET"
		if !x.Met {
			met = "not met"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", x.What, x.Value, x.Target, met)
	}
	tw.Flush()
	fmt.Fprintf(w, "\nbench took %s; logs in %s\n", total.Round(time.Second), b.logDir)
}

func (b *bench) reportMarkdown(w io.Writer, total time.Duration) {
	fmt.Fprintf(w, "Machine:\n\n")
	for _, f := range b.facts {
		fmt.Fprintf(w, "- %s\n", f)
	}
	c, r, e := b.set.totals()
	fmt.Fprintf(w, "\nImage set: %d images, %d unique layers, %.0f MiB compressed, %.0f MiB unpacked, %d tar entries.\n",
		len(b.set.Images), len(b.set.Unique), mib(c), mib(r), e)
	for _, t := range []struct {
		title string
		rows  []row
	}{{"Cold pull of the set", b.rows}, {"Capped link, big image only", b.capped}} {
		if len(t.rows) == 0 {
			continue
		}
		fmt.Fprintf(w, "\n%s:\n\n| scenario | wall s | sync s | download s | client CPU s | containerd CPU s | (decompressor s) | written MiB | disk MiB | client peak RSS MiB |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n", t.title)
		for _, x := range t.rows {
			dl := "-"
			if x.Download > 0 {
				dl = fmt.Sprintf("%.1f", x.Download.Seconds())
			}
			fmt.Fprintf(w, "| %s | %.1f | %.1f | %s | %.1f | %.1f | %.1f | %.0f | %.0f | %.1f |\n", x.Name, x.Wall.Seconds(), x.Sync.Seconds(), dl,
				x.Client.CPU.Seconds(), x.CtrdCPU.Seconds(), x.CtrdChild.Seconds(), mib(x.written()), mib(x.Disk), mib(x.Client.MaxRSS))
		}
	}
	if b.rerun != nil {
		fmt.Fprintf(w, "\n%s: %.2f s (client CPU %.2f s).\n", b.rerun.Name, b.rerun.Wall.Seconds(), b.rerun.Client.CPU.Seconds())
	}
	fmt.Fprintf(w, "\nTargets (issue 15, prepull's defaults):\n\n| target | measured | wanted | |\n|---|--:|--:|---|\n")
	for _, x := range b.ratios() {
		met := "met"
		if !x.Met {
			met = "**not met**"
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s |\n", x.What, x.Value, x.Target, met)
	}
	fmt.Fprintf(w, "\nBench wall time: %s.\n", total.Round(time.Second))
}
