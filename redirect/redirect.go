// Package redirect is the kernel side of detour: listeners that receive
// connections redirected by netfilter (REDIRECT or TPROXY), recovery of each
// connection's original destination, the socket mark that keeps detour's
// own outbound traffic out of the redirection rules, and those rules
// themselves: detour's own iptables chains (go-iptables), TPROXY's policy
// routing (netlink) and the sysctl and extension checks that tell whether
// they can work. It never changes a rule, chain or route it did not make.
//
// It does not read or write connection payload, choose routes or dial
// anything: that is package tunnel's job. The socket mark is handed to tunnel
// as a Dialer Control function, so tunnel never imports this package.
package redirect

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Mode says how the kernel hands connections to detour.
type Mode uint8

const (
	// Redirect is iptables -j REDIRECT (nat table): the connection arrives at
	// a local address and the original destination is read from conntrack
	// with SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST.
	Redirect Mode = iota
	// TProxy is iptables -j TPROXY (mangle table) with policy routing: the
	// listening socket is transparent and each accepted connection's local
	// address is its original destination.
	TProxy
)

// String returns the name used on the command line and in logs.
func (m Mode) String() string {
	switch m {
	case Redirect:
		return "redirect"
	case TProxy:
		return "tproxy"
	}
	return "mode(" + strconv.Itoa(int(m)) + ")"
}

// ParseMode parses "redirect" or "tproxy".
func ParseMode(s string) (Mode, error) {
	switch strings.ToLower(s) {
	case "redirect":
		return Redirect, nil
	case "tproxy":
		return TProxy, nil
	}
	return 0, fmt.Errorf("unknown mode %q (want redirect or tproxy)", s)
}

// ErrNotRedirected is returned by OriginalDst for a connection that was not
// handed over by a redirection rule: a client that connected to detour's
// listening address itself. Serving it would make detour an open proxy or
// dial itself in a loop, so the caller closes it.
var ErrNotRedirected = errors.New("connection was not redirected: its destination is detour's own listener")

// DefaultMark is the socket mark (SO_MARK) on detour's outbound sockets; the
// redirection rules exempt packets carrying it.
const DefaultMark = 0x2d

// ParseMark parses a socket mark in decimal or 0x-prefixed hexadecimal. Zero
// is refused: an unmarked socket cannot be told apart from client traffic.
func ParseMark(s string) (uint32, error) {
	v, err := strconv.ParseUint(s, 0, 32)
	if err != nil {
		return 0, fmt.Errorf("mark %q is not a 32-bit number (decimal or 0x hex)", s)
	}
	if v == 0 {
		return 0, errors.New("mark must not be 0: detour's own traffic must be told apart from clients'")
	}
	return uint32(v), nil
}
