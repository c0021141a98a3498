//go:build unix

package main

import (
	"os/exec"
	"syscall"
)

// setProcessGroup puts the client in a process group of its own, so that its
// helpers (Chromium has many) can be signalled with it.
func setProcessGroup(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
}

// signalGroup sends sig to the client's process group.
func signalGroup(cmd *exec.Cmd, sig syscall.Signal) error {
	if cmd.Process == nil {
		return nil
	}
	return syscall.Kill(-cmd.Process.Pid, sig)
}
