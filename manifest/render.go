package manifest

import (
	"bytes"
	"fmt"

	"gopkg.in/yaml.v3"
)

// Entry is one image to write: the reference as it should appear in the
// manifest (normalized, or repo:tag@digest) and an optional comment placed
// above it.
type Entry struct {
	Ref     string
	Comment string
}

// Render writes entries as the YAML form Parse reads, header as the comment
// above the images key. What it writes parses back to the same references.
func Render(header string, entries []Entry) ([]byte, error) {
	seq := &yaml.Node{Kind: yaml.SequenceNode}
	for _, e := range entries {
		seq.Content = append(seq.Content, &yaml.Node{
			Kind:        yaml.MappingNode,
			HeadComment: e.Comment,
			Content: []*yaml.Node{
				{Kind: yaml.ScalarNode, Value: "ref"},
				{Kind: yaml.ScalarNode, Value: e.Ref},
			},
		})
	}
	root := &yaml.Node{Kind: yaml.MappingNode, Content: []*yaml.Node{
		{Kind: yaml.ScalarNode, Value: "images", HeadComment: header},
		seq,
	}}
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(&yaml.Node{Kind: yaml.DocumentNode, Content: []*yaml.Node{root}}); err != nil {
		return nil, fmt.Errorf("encode manifest: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("encode manifest: %w", err)
	}
	return buf.Bytes(), nil
}
