package proxyport

import (
	"bufio"
	"errors"
	"fmt"
	"io"
)

// maxChunkLine caps a chunk-size line (size and extensions), maxTrailer the
// trailer section of a chunked body.
const (
	maxChunkLine = 4 << 10
	maxTrailer   = 16 << 10
)

// CopyBody streams one message body from br to dst, as it came: length
// bytes, or a chunked body with its chunk lines and trailers, which it
// parses only to find where it ends. It never holds more than br's buffer.
// It returns the bytes written.
func CopyBody(dst io.Writer, br *bufio.Reader, chunked bool, length int64) (int64, error) {
	if !chunked {
		if length <= 0 {
			return 0, nil
		}
		n, err := io.CopyN(dst, br, length)
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return n, err
	}
	return copyChunked(dst, br)
}

var errChunk = errors.New("malformed chunked body")

func copyChunked(dst io.Writer, br *bufio.Reader) (int64, error) {
	var total int64
	write := func(b []byte) error {
		n, err := dst.Write(b)
		total += int64(n)
		return err
	}
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			if err == bufio.ErrBufferFull {
				return total, fmt.Errorf("%w: chunk-size line too long", errChunk)
			}
			return total, noEOF(err)
		}
		if len(line) > maxChunkLine {
			return total, fmt.Errorf("%w: chunk-size line too long", errChunk)
		}
		size, err := chunkSize(line)
		if err != nil {
			return total, err
		}
		if err := write(line); err != nil {
			return total, err
		}
		if size == 0 {
			break
		}
		n, err := io.CopyN(dst, br, size)
		total += n
		if err != nil {
			return total, noEOF(err)
		}
		crlf, err := br.ReadSlice('\n')
		if err != nil {
			return total, noEOF(err)
		}
		if s := string(crlf); s != "\r\n" && s != "\n" {
			return total, fmt.Errorf("%w: chunk data not followed by CRLF", errChunk)
		}
		if err := write(crlf); err != nil {
			return total, err
		}
	}
	// The trailer section, up to and including the empty line.
	used := 0
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			if err == bufio.ErrBufferFull {
				return total, fmt.Errorf("%w: trailer line too long", errChunk)
			}
			return total, noEOF(err)
		}
		if used += len(line); used > maxTrailer {
			return total, fmt.Errorf("%w: trailers larger than %d bytes", errChunk, maxTrailer)
		}
		if err := write(line); err != nil {
			return total, err
		}
		if string(line) == "\r\n" || string(line) == "\n" {
			return total, nil
		}
	}
}

// chunkSize parses "HEX[;ext]CRLF" (RFC 9112 §7.1).
func chunkSize(line []byte) (int64, error) {
	var n int64
	i := 0
	for ; i < len(line); i++ {
		c := line[i]
		var d byte
		switch {
		case '0' <= c && c <= '9':
			d = c - '0'
		case 'a' <= c && c <= 'f':
			d = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			d = c - 'A' + 10
		default:
			goto end
		}
		if n >= 1<<58 {
			return 0, fmt.Errorf("%w: chunk size too large", errChunk)
		}
		n = n<<4 | int64(d)
	}
end:
	if i == 0 {
		return 0, fmt.Errorf("%w: no chunk size", errChunk)
	}
	rest := line[i:]
	rest = rest[:len(rest)-1] // the LF
	if n := len(rest); n > 0 && rest[n-1] == '\r' {
		rest = rest[:n-1]
	}
	if len(rest) > 0 && rest[0] != ';' && rest[0] != ' ' && rest[0] != '\t' {
		return 0, fmt.Errorf("%w: junk after the chunk size", errChunk)
	}
	for _, c := range rest {
		// Extensions are passed on; they must not hide a line end.
		if (c < ' ' && c != '\t') || c == 0x7f {
			return 0, fmt.Errorf("%w: control character in a chunk extension", errChunk)
		}
	}
	return n, nil
}
