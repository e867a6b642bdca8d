package workload

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
)

// document is one YAML document (or JSON value) of a stream.
type document struct {
	index  int // 1-based
	start  int // line of the document's first line (after "---"), 1-based
	line   int // first line with content, 1-based
	source string
	data   []byte
}

func (d document) empty() bool {
	for _, l := range strings.Split(string(d.data), "\n") {
		l = strings.TrimSpace(l)
		if l != "" && !strings.HasPrefix(l, "#") {
			return false
		}
	}
	return true
}

var helmSource = regexp.MustCompile(`^#\s*Source:\s*(\S.*?)\s*$`)

// splitYAML cuts a stream at "---" lines, as apimachinery's YAMLReader does
// (a separator may carry a trailing comment), keeping line numbers and
// helm's "# Source:" comment.
func splitYAML(data []byte) []document {
	var (
		docs []document
		cur  = document{index: 1}
		buf  bytes.Buffer
	)
	flush := func() {
		cur.data = append([]byte(nil), buf.Bytes()...)
		docs = append(docs, cur)
		buf.Reset()
		cur = document{index: cur.index + 1}
	}
	cur.start = 1
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64*1024), 64*1024*1024)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSuffix(sc.Text(), "\r")
		if rest, ok := strings.CutPrefix(line, "---"); ok {
			if t := strings.TrimSpace(rest); t == "" || strings.HasPrefix(t, "#") {
				if buf.Len() > 0 || n > 1 {
					flush()
				}
				cur.start = n + 1
				continue
			}
		}
		t := strings.TrimSpace(line)
		if m := helmSource.FindStringSubmatch(t); m != nil && cur.line == 0 {
			cur.source = m[1]
		}
		if cur.line == 0 && t != "" && !strings.HasPrefix(t, "#") {
			cur.line = n
		}
		buf.WriteString(line)
		buf.WriteByte('\n')
	}
	if buf.Len() > 0 {
		flush()
	}
	return docs
}

func startsWithJSON(data []byte) bool {
	t := bytes.TrimSpace(data)
	return len(t) > 0 && (t[0] == '{' || t[0] == '[')
}

// splitJSON cuts a stream of JSON values (one object, usually).
func splitJSON(data []byte) ([]document, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	var docs []document
	for i := 1; ; i++ {
		start := dec.InputOffset()
		var raw json.RawMessage
		if err := dec.Decode(&raw); err == io.EOF {
			return docs, nil
		} else if err != nil {
			off := dec.InputOffset()
			var se *json.SyntaxError
			if errors.As(err, &se) {
				off = se.Offset
			}
			return nil, fmt.Errorf("%d: %w", 1+bytes.Count(data[:min(int(off), len(data))], []byte("\n")), err)
		}
		skip := int(start)
		for skip < len(data) && (data[skip] == ' ' || data[skip] == '\n' || data[skip] == '\r' || data[skip] == '\t') {
			skip++
		}
		line := 1 + bytes.Count(data[:skip], []byte("\n"))
		docs = append(docs, document{index: i, start: line, line: line, data: raw})
	}
}

var yamlErrLine = regexp.MustCompile(`yaml: line (\d+): `)

// errorLine turns the document-relative line of a YAML syntax error into a
// line of the file, and drops it from the message; other errors are placed
// at the document's first line.
func errorLine(d document, err error) (int, error) {
	m := yamlErrLine.FindStringSubmatch(err.Error())
	if m == nil {
		return d.line, err
	}
	n, _ := strconv.Atoi(m[1])
	if n < 1 {
		return d.line, err
	}
	return d.start + n - 1, errors.New(strings.Replace(err.Error(), m[0], "yaml: ", 1))
}

var yamlConvertPrefix = regexp.MustCompile(`^error converting YAML to JSON: `)

func cleanYAMLError(err error) error {
	return errors.New(yamlConvertPrefix.ReplaceAllString(err.Error(), ""))
}
