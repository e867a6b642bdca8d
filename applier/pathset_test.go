package applier

import (
	"fmt"
	"testing"
)

func TestPathSet(t *testing.T) {
	s := newPathSet()
	for i := range 100000 {
		s.add(fmt.Sprintf("/usr/lib/python3/site-packages/pkg%d/mod%d.py", i/100, i))
	}
	for i := range 100000 {
		if p := fmt.Sprintf("/usr/lib/python3/site-packages/pkg%d/mod%d.py", i/100, i); !s.has(p) {
			t.Fatalf("%s added but not found", p)
		}
		if p := fmt.Sprintf("/usr/lib/python3/site-packages/pkg%d/mod%d.pyc", i/100, i); s.has(p) {
			t.Fatalf("%s found but never added", p)
		}
	}
	if s.has("") || s.has("/") {
		t.Error("empty set member found")
	}
	// Another set draws other seeds: the same paths, other keys.
	if o := newPathSet(); o.key("/a") == s.key("/a") {
		t.Error("two sets share their seeds")
	}
}
