//go:build !linux

package tunnel

import "errors"

// setMark: socket marks are Linux's.
func setMark(fd int, mark uint32) error {
	return errors.New("socket marks need Linux")
}
