package proxyport

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"strings"
)

// Users maps user names to passwords for the proxy port. An empty Users
// asks for no credentials.
type Users map[string]string

// Check reports whether user and pass are one of the pairs. The comparison
// takes the same time whichever byte differs.
func (u Users) Check(user, pass string) bool {
	want, ok := u[user]
	if !ok {
		want = "\x00unknown user"
	}
	a, b := sha256.Sum256([]byte(pass)), sha256.Sum256([]byte(want))
	return subtle.ConstantTimeCompare(a[:], b[:]) == 1 && ok
}

// Basic decodes a "Basic base64(user:pass)" credential (RFC 7617). ok is
// false for any other scheme or a malformed value.
func Basic(v string) (user, pass string, ok bool) {
	scheme, cred, found := strings.Cut(strings.TrimSpace(v), " ")
	if !found || !strings.EqualFold(scheme, "Basic") {
		return "", "", false
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(cred))
	if err != nil {
		return "", "", false
	}
	user, pass, ok = strings.Cut(string(raw), ":")
	return user, pass, ok
}
