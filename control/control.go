// Package control is the management protocol between the encdisk command line
// and a mount daemon.
//
// # Why
//
// While a volume is mounted the daemon owns it (it holds the volume's lock and
// the unwrapped data keys), so every management command — disk create, attach,
// snapshot … — is sent to the daemon instead of being done directly. This
// package carries those requests over a Unix socket kept inside the volume
// (volume.SocketPath). It knows nothing of volumes: an operation is a name and
// JSON arguments, and the daemon's handler decides what they mean.
//
// # Wire format
//
// Newline-delimited JSON. The client writes one Request per line,
//
//	{"op":"disk.create","args":{...}}
//
// and the server answers each with one Response line,
//
//	{"result":{...}}                      success
//	{"error":"...","hint":"...","code":1,"kind":"not_found"}  failure
//
// A connection may carry any number of request/response pairs, in order. A
// request line longer than MaxRequest is refused (with an error response) and
// the connection is closed, so a misbehaving client cannot make the daemon
// buffer without bound.
//
// # Threat model
//
// The socket file is created mode 0600 inside the volume directory: only the
// volume's owner (and root) can connect, and anyone who can connect could as
// well open the volume directly once it is unmounted. Requests carry no key
// material; the daemon uses the keystore it unlocked at mount time.
package control

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"
)

// MaxRequest bounds one request line in bytes, newline excluded.
const MaxRequest = 1 << 20

// maxOp bounds the length of an operation name.
const maxOp = 64

// Sentinel errors.
var (
	// ErrNoDaemon means nothing listens on the socket: the volume is not mounted
	// (or its daemon died and left a stale socket file).
	ErrNoDaemon = errors.New("no daemon listening")
	// ErrTooLarge means a request line exceeded MaxRequest.
	ErrTooLarge = errors.New("request too large")
	// ErrMalformed means a request line is not a valid request.
	ErrMalformed = errors.New("malformed request")
	// ErrCanceled means the caller gave up on a call (CallCancel) and hung
	// up: the daemon's handler sees its context canceled.
	ErrCanceled = errors.New("call canceled by the caller")
	// ErrDaemonGone means the daemon closed the connection before it
	// answered: it exited or was killed while it ran the call.
	ErrDaemonGone = errors.New("the mount daemon went away before it answered")
)

// Request is one management call.
type Request struct {
	Op   string          `json:"op"`
	Args json.RawMessage `json:"args,omitempty"`
}

// Response is the answer to one Request: either Result or Error is set.
type Response struct {
	Result json.RawMessage `json:"result,omitempty"`
	Error  string          `json:"error,omitempty"`
	Hint   string          `json:"hint,omitempty"`
	Code   int             `json:"code,omitempty"`
	Kind   string          `json:"kind,omitempty"`
}

// Error is a failure reported by the other side (or built by a handler to be
// sent there): the message, an optional hint for the user, and an optional
// exit code. It lets the command line print a daemon's error exactly as it
// would print the same error met directly.
//
// Kind is a short machine-readable class of the error (for example
// "not_found"), so the receiving side can react to it, or word its own hint,
// as it would for the sentinel error it stands for.
type Error struct {
	Message string
	Hint    string
	Code    int
	Kind    string
}

func (e *Error) Error() string { return e.Message }

// DecodeRequest parses and validates one request line (without its newline).
func DecodeRequest(line []byte) (*Request, error) {
	if len(line) > MaxRequest {
		return nil, ErrTooLarge
	}
	var req Request
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: trailing data after the request", ErrMalformed)
	}
	if err := validOp(req.Op); err != nil {
		return nil, err
	}
	if len(req.Args) > 0 && !json.Valid(req.Args) {
		// Unreachable through the decoder, kept so the invariant is local.
		return nil, fmt.Errorf("%w: args are not valid JSON", ErrMalformed)
	}
	return &req, nil
}

// validOp accepts short names of lower-case letters, digits, '.', '-' and '_'.
func validOp(op string) error {
	if op == "" {
		return fmt.Errorf("%w: missing op", ErrMalformed)
	}
	if len(op) > maxOp || !utf8.ValidString(op) {
		return fmt.Errorf("%w: bad op name", ErrMalformed)
	}
	for _, r := range op {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '.', r == '-', r == '_':
		default:
			return fmt.Errorf("%w: bad op name %q", ErrMalformed, op)
		}
	}
	return nil
}

// readLine reads one newline-terminated line of at most max bytes. A longer
// line returns ErrTooLarge (the rest of it is left unread).
func readLine(r *bufio.Reader, max int) ([]byte, error) {
	var buf []byte
	for {
		chunk, err := r.ReadSlice('\n')
		if len(buf)+len(chunk) > max+1 { // +1: the newline
			return nil, ErrTooLarge
		}
		buf = append(buf, chunk...)
		if err == nil {
			return buf[:len(buf)-1], nil
		}
		if err == bufio.ErrBufferFull {
			continue
		}
		if err != nil {
			if len(buf) > 0 && errors.Is(err, io.EOF) {
				return nil, fmt.Errorf("%w: truncated line", ErrMalformed)
			}
			return nil, err
		}
	}
}
