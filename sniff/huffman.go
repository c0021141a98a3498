package sniff

// huffmanCodeLen is the length in bits of the code of each symbol of the
// HPACK Huffman code (RFC 7541 Appendix B); symbol 256 is EOS. The code is
// canonical: codes of one length are consecutive, in symbol order, and follow
// the codes one bit shorter, so the lengths define it completely (the test
// checks this against codes copied from the RFC).
var huffmanCodeLen = [257]uint8{
	13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
	28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
	6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
	5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
	13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
	7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
	15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
	6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
	20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
	24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
	22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
	21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
	26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
	19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
	20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
	26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
	30, // EOS
}

const (
	huffmanMaxLen = 30
	huffmanEOS    = 256
)

// huffmanTable is the canonical HPACK code in decoding form: how many codes
// each length has, and the symbols in code order.
type huffmanTable struct {
	count  [huffmanMaxLen + 1]uint16
	symbol [257]uint16
}

// huffman is computed once from huffmanCodeLen and never written again.
var huffman = newHuffmanTable()

func newHuffmanTable() *huffmanTable {
	t := new(huffmanTable)
	for _, l := range huffmanCodeLen {
		t.count[l]++
	}
	i := 0
	for l := 1; l <= huffmanMaxLen; l++ {
		for s, sl := range huffmanCodeLen {
			if int(sl) == l {
				t.symbol[i] = uint16(s)
				i++
			}
		}
	}
	return t
}

// huffmanDecode decodes the Huffman-coded string src into dst (RFC 7541
// §5.2) and returns the decoded length. fits is false if dst filled up
// before the end (dst then holds a prefix and the rest is not checked). ok is
// false if src is not a valid encoding: it holds EOS, or ends in padding
// that is 8 bits or longer or not all ones.
func huffmanDecode(dst, src []byte) (n int, fits, ok bool) {
	t := huffman
	code, first, index, bits := 0, 0, 0, 0
	ones := true // the bits since the last symbol are all ones
	for _, c := range src {
		for k := 7; k >= 0; k-- {
			bit := int(c>>k) & 1
			code |= bit
			ones = ones && bit == 1
			bits++
			count := int(t.count[bits])
			if code-count < first {
				sym := t.symbol[index+code-first]
				if sym == huffmanEOS {
					return n, true, false
				}
				if n == len(dst) {
					return n, false, true
				}
				dst[n] = byte(sym)
				n++
				code, first, index, bits, ones = 0, 0, 0, 0, true
				continue
			}
			if bits == huffmanMaxLen {
				return n, true, false // unreachable: the code is complete
			}
			index += count
			first = (first + count) << 1
			code <<= 1
		}
	}
	return n, true, bits < 8 && ones
}
