package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// fileConfig is the YAML configuration file (detour run --config FILE). Every
// field is optional; flags given on the command line override it. See the
// README for a complete example.
type fileConfig struct {
	Listen      string   `yaml:"listen"`
	Mode        string   `yaml:"mode"`
	Mark        string   `yaml:"mark"`
	DialTimeout duration `yaml:"dial_timeout"`
	IdleTimeout duration `yaml:"idle_timeout"`
	Grace       duration `yaml:"grace"`
	LogFormat   string   `yaml:"log_format"`
	// Firewall is the rules backend: auto, iptables or nftables.
	Firewall string `yaml:"firewall"`

	// UDP captures and carries UDP in tproxy mode (default true there).
	UDP            *bool    `yaml:"udp"`
	MaxUDPSessions int      `yaml:"max_udp_sessions"`
	UDPIdleTimeout duration `yaml:"udp_idle_timeout"`
	UDPDNSTimeout  duration `yaml:"udp_dns_timeout"`
	UDPQUICTimeout duration `yaml:"udp_quic_timeout"`

	Sniff  *sniffConfig  `yaml:"sniff"`
	Proxy  *proxyConfig  `yaml:"proxy"`
	Groups []groupConfig `yaml:"groups"`
	Rules  []ruleConfig  `yaml:"rules"`
	// Default is the action when no rule matches: direct, reject or a
	// group's name. Empty means direct.
	Default string `yaml:"default"`

	line map[string]int // line of each top-level key, for messages
}

type sniffConfig struct {
	// Enabled false turns sniffing off: every connection is routed by IP.
	Enabled *bool    `yaml:"enabled"`
	Timeout duration `yaml:"timeout"`
	// MaxBytes caps what is read while looking for a host name.
	MaxBytes int `yaml:"max_bytes"`
	// SkipPorts are destination ports whose server speaks first (SSH,
	// SMTP, …): no sniffing is tried. Replaces the default list.
	SkipPorts *stringList `yaml:"skip_ports"`
	// SilentTTL is how long a destination seen speaking first (its server
	// greeted a silent client) is remembered, so its next connections skip
	// the wait; 0 keeps the default.
	SilentTTL duration `yaml:"silent_ttl"`
	// SilentEntries bounds that memory.
	SilentEntries int `yaml:"silent_entries"`
	line          int
}

type groupConfig struct {
	Name      string           `yaml:"name"`
	Strategy  string           `yaml:"strategy"`
	HashKey   string           `yaml:"hash_key"`
	Upstreams []upstreamConfig `yaml:"upstreams"`
	Probe     *probeConfig     `yaml:"probe"`
	// UDP is what UDP sessions routed to the group do when none of its
	// upstreams can carry UDP (HTTP CONNECT cannot): reject or direct.
	UDP  string `yaml:"udp"`
	line int
}

// upstreamConfig is a URL, given alone or as {url, weight}.
type upstreamConfig struct {
	URL    string `yaml:"url"`
	Weight int    `yaml:"weight"`
	line   int
}

type probeConfig struct {
	Interval duration `yaml:"interval"`
	Timeout  duration `yaml:"timeout"`
	line     int
}

type ruleConfig struct {
	Domain        stringList `yaml:"domain"`
	DomainSuffix  stringList `yaml:"domain_suffix"`
	DomainKeyword stringList `yaml:"domain_keyword"`
	CIDR          stringList `yaml:"cidr"`
	Port          stringList `yaml:"port"`
	Protocol      stringList `yaml:"protocol"`
	Inbound       stringList `yaml:"inbound"`
	// Network limits the rule to tcp, udp or both.
	Network stringList `yaml:"network"`
	Action  string     `yaml:"action"`
	// SendName: override (default), route-only or verify.
	SendName string `yaml:"send_name"`
	line     int
}

// loadConfig reads and decodes FILE. Unknown fields are errors; messages
// carry the file name and line.
func loadConfig(path string) (*fileConfig, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--config: %w", err)
	}
	cfg, err := parseConfig(data)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

func parseConfig(data []byte) (*fileConfig, error) {
	var root yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&root); err != nil {
		if errors.Is(err, io.EOF) {
			return &fileConfig{}, nil // an empty file
		}
		return nil, cleanYAMLError(err)
	}
	cfg := &fileConfig{}
	if err := root.Decode(cfg); err != nil {
		return nil, cleanYAMLError(err)
	}
	return cfg, nil
}

func (c *fileConfig) UnmarshalYAML(n *yaml.Node) error {
	if err := checkKeys(n, "the top level", "listen", "mode", "mark", "dial_timeout", "idle_timeout",
		"grace", "log_format", "firewall", "sniff", "proxy", "groups", "rules", "default",
		"udp", "max_udp_sessions", "udp_idle_timeout", "udp_dns_timeout", "udp_quic_timeout"); err != nil {
		return err
	}
	type plain fileConfig
	if err := n.Decode((*plain)(c)); err != nil {
		return err
	}
	c.line = map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		c.line[n.Content[i].Value] = n.Content[i].Line
	}
	return nil
}

func (c *sniffConfig) UnmarshalYAML(n *yaml.Node) error {
	if err := checkKeys(n, "sniff", "enabled", "timeout", "max_bytes", "skip_ports", "silent_ttl", "silent_entries"); err != nil {
		return err
	}
	type plain sniffConfig
	c.line = n.Line
	return n.Decode((*plain)(c))
}

func (g *groupConfig) UnmarshalYAML(n *yaml.Node) error {
	if err := checkKeys(n, "a group", "name", "strategy", "hash_key", "upstreams", "probe", "udp"); err != nil {
		return err
	}
	type plain groupConfig
	g.line = n.Line
	return n.Decode((*plain)(g))
}

func (u *upstreamConfig) UnmarshalYAML(n *yaml.Node) error {
	u.line = n.Line
	if n.Kind == yaml.ScalarNode {
		u.URL = n.Value
		return nil
	}
	if err := checkKeys(n, "an upstream", "url", "weight"); err != nil {
		return err
	}
	type plain upstreamConfig
	return n.Decode((*plain)(u))
}

func (p *probeConfig) UnmarshalYAML(n *yaml.Node) error {
	if err := checkKeys(n, "probe", "interval", "timeout"); err != nil {
		return err
	}
	type plain probeConfig
	p.line = n.Line
	return n.Decode((*plain)(p))
}

func (r *ruleConfig) UnmarshalYAML(n *yaml.Node) error {
	if err := checkKeys(n, "a rule", "domain", "domain_suffix", "domain_keyword", "cidr", "port",
		"protocol", "inbound", "network", "action", "send_name"); err != nil {
		return err
	}
	type plain ruleConfig
	r.line = n.Line
	return n.Decode((*plain)(r))
}

// checkKeys refuses a mapping with keys other than known, naming the line.
func checkKeys(n *yaml.Node, what string, known ...string) error {
	if n.Kind != yaml.MappingNode {
		return fmt.Errorf("line %d: %s must be a mapping of fields", n.Line, what)
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k := n.Content[i]
		if !slices.Contains(known, k.Value) {
			return fmt.Errorf("line %d: unknown field %q in %s (known: %s)", k.Line, k.Value, what, strings.Join(known, ", "))
		}
	}
	return nil
}

// duration is a Go duration string such as 300ms or 5m.
type duration struct {
	time.Duration
	set bool
}

func (d *duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil || v < 0 {
		return fmt.Errorf("line %d: %q is not a duration (like 300ms, 10s or 5m)", n.Line, n.Value)
	}
	d.Duration, d.set = v, true
	return nil
}

// stringList accepts one scalar or a list of scalars.
type stringList []string

func (s *stringList) UnmarshalYAML(n *yaml.Node) error {
	switch n.Kind {
	case yaml.ScalarNode:
		*s = []string{n.Value}
		return nil
	case yaml.SequenceNode:
		for _, c := range n.Content {
			if c.Kind != yaml.ScalarNode {
				return fmt.Errorf("line %d: want a value, got a nested structure", c.Line)
			}
			*s = append(*s, c.Value)
		}
		return nil
	}
	return fmt.Errorf("line %d: want a value or a list of values", n.Line)
}

// cleanYAMLError drops the library's "yaml: " prefix and type names.
func cleanYAMLError(err error) error {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	msg = strings.ReplaceAll(msg, "unmarshal errors:\n  ", "")
	return errors.New(strings.ReplaceAll(msg, "\n  ", "; "))
}
