package main

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"

	"github.com/detour-proxy/detour/ports"
	"github.com/detour-proxy/detour/sniff"
	"github.com/detour-proxy/detour/tunnel"
	"github.com/detour-proxy/detour/tunnel/upstream"
)

// routing is what `detour run` sends where: the router and the groups it
// names (their probes are started by runCommand).
type routing struct {
	router *tunnel.Router
	groups []*upstream.Group
}

// buildRouting makes the routing table from --upstream (one group for all
// traffic) or, without it, from the config file's groups, rules and
// default. No upstream and no file: everything direct. forward is the dialer
// template for upstream proxies (timeout, socket mark); log receives the
// groups' health changes.
func buildRouting(upstreams []string, strategy string, fc *fileConfig, forward *net.Dialer, log *slog.Logger) (routing, error) {
	if len(upstreams) > 0 {
		g := &upstream.Group{Name: "upstream", Log: log}
		for _, raw := range upstreams {
			u, err := upstream.Parse(raw, forward)
			if err != nil {
				return routing{}, usageError{fmt.Sprintf("--upstream: %v", err)}
			}
			g.Upstreams = append(g.Upstreams, u)
		}
		if strategy == "" {
			strategy = "round-robin"
		}
		s, err := upstream.NewStrategy(strategy)
		if err != nil {
			return routing{}, usageError{fmt.Sprintf("--strategy: %v", err)}
		}
		g.Strategy = s
		return routing{
			router: &tunnel.Router{Default: tunnel.Action{Kind: tunnel.ActionProxy, Group: g}},
			groups: []*upstream.Group{g},
		}, nil
	}
	if strategy != "" {
		return routing{}, usageError{"--strategy: only with --upstream (groups in a config file set their own)"}
	}
	if fc == nil {
		return routing{}, nil
	}

	byName := map[string]*upstream.Group{}
	var rt routing
	for i, gc := range fc.Groups {
		where := fmt.Sprintf("groups[%d] (line %d)", i, gc.line)
		name := strings.TrimSpace(gc.Name)
		switch {
		case name == "":
			return routing{}, usageError{where + ": name is missing"}
		case name == "direct" || name == "reject":
			return routing{}, usageError{fmt.Sprintf("%s: name %q is reserved for the action of that name", where, name)}
		case byName[name] != nil:
			return routing{}, usageError{fmt.Sprintf("%s: name %q is used by an earlier group", where, name)}
		case len(gc.Upstreams) == 0:
			return routing{}, usageError{fmt.Sprintf("%s: group %q has no upstreams", where, name)}
		}
		g := &upstream.Group{Name: name, Log: log}
		sname := gc.Strategy
		if sname == "" {
			sname = "round-robin"
		}
		s, err := upstream.NewStrategy(sname)
		if err != nil {
			return routing{}, usageError{fmt.Sprintf("%s: strategy: %v", where, err)}
		}
		g.Strategy = s
		if g.Key, err = upstream.ParseHashKey(gc.HashKey); err != nil {
			return routing{}, usageError{fmt.Sprintf("%s: hash_key: %v", where, err)}
		}
		for j, uc := range gc.Upstreams {
			u, err := upstream.Parse(uc.URL, forward)
			if err != nil {
				return routing{}, usageError{fmt.Sprintf("groups[%d].upstreams[%d] (line %d): %v", i, j, uc.line, err)}
			}
			if uc.Weight != 0 {
				if uc.Weight < 1 || uc.Weight > upstream.MaxWeight {
					return routing{}, usageError{fmt.Sprintf("groups[%d].upstreams[%d] (line %d): weight %d is not from 1 to %d", i, j, uc.line, uc.Weight, upstream.MaxWeight)}
				}
				u.Weight = uc.Weight
			}
			g.Upstreams = append(g.Upstreams, u)
		}
		if p := gc.Probe; p != nil {
			if p.Interval.Duration <= 0 {
				return routing{}, usageError{fmt.Sprintf("%s: probe.interval must be set and positive", where)}
			}
			g.Probe = upstream.ProbeConfig{Interval: p.Interval.Duration, Timeout: p.Timeout.Duration}
		}
		if g.UDPFallback, err = upstream.ParseUDPFallback(strings.TrimSpace(gc.UDP)); err != nil {
			return routing{}, usageError{fmt.Sprintf("%s: udp: %v", where, err)}
		}
		byName[name] = g
		rt.groups = append(rt.groups, g)
	}

	action := func(where, s, sendName string) (tunnel.Action, error) {
		nm, err := tunnel.ParseNameMode(sendName)
		if err != nil {
			return tunnel.Action{}, usageError{fmt.Sprintf("%s: send_name: %v", where, err)}
		}
		switch s = strings.TrimSpace(s); s {
		case "", "direct":
			if s == "" && where != "default" {
				return tunnel.Action{}, usageError{where + ": action is missing (direct, reject or a group's name)"}
			}
			return tunnel.Action{Kind: tunnel.ActionDirect}, nil
		case "reject":
			return tunnel.Action{Kind: tunnel.ActionReject}, nil
		}
		g := byName[s]
		if g == nil {
			return tunnel.Action{}, usageError{fmt.Sprintf("%s: action %q is not direct, reject or a group's name", where, s)}
		}
		return tunnel.Action{Kind: tunnel.ActionProxy, Group: g, Name: nm}, nil
	}

	rt.router = &tunnel.Router{}
	for i, rc := range fc.Rules {
		where := fmt.Sprintf("rules[%d] (line %d)", i, rc.line)
		var r tunnel.Rule
		var err error
		if r.Action, err = action(where, rc.Action, rc.SendName); err != nil {
			return routing{}, err
		}
		for _, d := range rc.Domain {
			r.Domains = append(r.Domains, tunnel.NormalizeDomain(d))
		}
		for _, d := range rc.DomainSuffix {
			r.Suffixes = append(r.Suffixes, tunnel.NormalizeDomain(d))
		}
		for _, k := range rc.DomainKeyword {
			r.Keywords = append(r.Keywords, strings.ToLower(strings.TrimSpace(k)))
		}
		for _, c := range rc.CIDR {
			p, err := netip.ParsePrefix(strings.TrimSpace(c))
			if err != nil {
				return routing{}, usageError{fmt.Sprintf("%s: cidr %q is not a CIDR (like 10.0.0.0/8 or fd00::/8)", where, c)}
			}
			r.CIDRs = append(r.CIDRs, p.Masked())
		}
		for _, pl := range rc.Port {
			ports, err := ports.Parse(pl)
			if err != nil {
				return routing{}, usageError{fmt.Sprintf("%s: port: %v", where, err)}
			}
			r.Ports = append(r.Ports, ports...)
		}
		for _, p := range rc.Protocol {
			proto, err := sniff.ParseProto(strings.ToLower(p))
			if err != nil {
				return routing{}, usageError{fmt.Sprintf("%s: protocol %v", where, err)}
			}
			r.Protos = append(r.Protos, proto)
		}
		for _, in := range rc.Inbound {
			inbound, err := tunnel.ParseInbound(strings.ToLower(strings.TrimSpace(in)))
			if err != nil {
				return routing{}, usageError{fmt.Sprintf("%s: inbound %v", where, err)}
			}
			r.Inbounds = append(r.Inbounds, inbound)
		}
		for _, n := range rc.Network {
			nw, err := tunnel.ParseNetwork(n)
			if err != nil {
				return routing{}, usageError{fmt.Sprintf("%s: network: %v", where, err)}
			}
			r.Networks |= nw
		}
		if len(r.Domains)+len(r.Suffixes)+len(r.Keywords)+len(r.CIDRs)+len(r.Ports)+len(r.Protos)+len(r.Inbounds) == 0 && r.Networks == 0 {
			return routing{}, usageError{where + ": no condition (domain, domain_suffix, domain_keyword, cidr, port, protocol, inbound or network); use default for a catch-all"}
		}
		for _, d := range append(append(append([]string{}, r.Domains...), r.Suffixes...), r.Keywords...) {
			if d == "" {
				return routing{}, usageError{where + ": empty domain"}
			}
		}
		rt.router.Rules = append(rt.router.Rules, r)
	}
	var err error
	if rt.router.Default, err = action("default", fc.Default, ""); err != nil {
		return routing{}, err
	}
	return rt, nil
}
