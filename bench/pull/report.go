package main

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
)

// ratio is one target of issue 6 with its measured value.
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

func (b *bench) ratios() []ratio {
	var out []ratio
	seq, ideal := b.find("ctr sequential"), b.find("ideal")
	def, best := b.find("prepull defaults"), b.bestPrepull(b.rows)
	add := func(what, target string, ok bool, format string, args ...any) {
		out = append(out, ratio{What: what, Target: target, Value: fmt.Sprintf(format, args...), Met: ok, Known: true})
	}
	for _, p := range []*row{def, best} {
		if p == nil {
			continue
		}
		if seq != nil {
			v := p.Wall.Seconds() / seq.Wall.Seconds()
			add("cold set: "+p.Name+" / ctr sequential", "≤ 0.50×", v <= 0.5, "%.2f×", v)
		}
		if ideal != nil {
			v := p.Wall.Seconds() / ideal.Wall.Seconds()
			add("cold set: "+p.Name+" / ideal pipeline", "≤ 1.20×", v <= 1.2, "%.2f×", v)
		}
		if def == best {
			break
		}
	}
	var rss int64
	var share float64
	var shareName string
	for _, r := range b.rows {
		if !strings.Contains(r.Name, "prepull") {
			continue
		}
		rss = max(rss, r.Client.MaxRSS)
		if s := r.Client.CPU.Seconds() / r.totalCPU().Seconds(); s > share {
			share, shareName = s, r.Name
		}
	}
	if rss > 0 {
		add("prepull peak RSS (max over runs)", "≤ 64 MiB", rss <= 64<<20, "%.1f MiB", mib(rss))
		add("prepull CPU share of prepull+containerd (worst: "+shareName+")", "≤ 10 %", share <= 0.10, "%.1f %%", 100*share)
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
	if cp := b.bestPrepull(b.capped); cp != nil && cctr != nil {
		v := cctr.Wall.Seconds() / cp.Wall.Seconds()
		add("capped link, big image: ctr / best prepull, wall", "≥ 3×", v >= 3, "%.2f×", v)
		if cp.Download > 0 && cctr.Download > 0 {
			v := cctr.Download.Seconds() / cp.Download.Seconds()
			add("capped link, big image: ctr / best prepull, download phase", "≥ 3×", v >= 3, "%.2f×", v)
		}
	}
	return out
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
	fmt.Fprintln(w, "\ntargets (issue 6)")
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
	fmt.Fprintf(w, "\nTargets:\n\n| target | measured | wanted | |\n|---|--:|--:|---|\n")
	for _, x := range b.ratios() {
		met := "met"
		if !x.Met {
			met = "**not met**"
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s |\n", x.What, x.Value, x.Target, met)
	}
	fmt.Fprintf(w, "\nBench wall time: %s.\n", total.Round(time.Second))
}
