package control

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"
)

// Client calls a daemon. The zero value is not usable; use Dial.
type Client struct {
	c net.Conn
	r *bufio.Reader
	// Timeout bounds each Call (writing the request and reading the answer).
	// Zero means no limit.
	Timeout time.Duration
}

// Dial connects to the socket at path. It returns an error wrapping
// ErrNoDaemon when nothing listens there (no socket file, or a stale one).
func Dial(path string, timeout time.Duration) (*Client, error) {
	c, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("%w on %s", ErrNoDaemon, path)
		}
		return nil, fmt.Errorf("control: connect to %s: %w", path, err)
	}
	return &Client{c: c, r: bufio.NewReaderSize(c, 64<<10), Timeout: 5 * time.Minute}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.c.Close() }

// Call sends op with args (marshalled to JSON; nil for none) and decodes the
// result into result (which may be nil to discard it). A failure reported by
// the daemon is returned as *Error.
func (c *Client) Call(op string, args, result any) error {
	if err := validOp(op); err != nil {
		return err
	}
	req := Request{Op: op}
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return fmt.Errorf("control: encode %s: %w", op, err)
		}
		req.Args = b
	}
	line, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("control: encode %s: %w", op, err)
	}
	if len(line) > MaxRequest {
		return fmt.Errorf("control: %s: %w", op, ErrTooLarge)
	}
	if c.Timeout > 0 {
		c.c.SetDeadline(time.Now().Add(c.Timeout))
	} else {
		c.c.SetDeadline(time.Time{})
	}
	if _, err := c.c.Write(append(line, '\n')); err != nil {
		return fmt.Errorf("control: send %s: %w", op, err)
	}
	// Responses are not bounded by MaxRequest (a disk list can be long), but
	// they are bounded: 64 MiB is far more than any answer.
	resp, err := readLine(c.r, 64<<20)
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) {
		return fmt.Errorf("control: %s: %w", op, ErrDaemonGone)
	}
	if err != nil {
		return fmt.Errorf("control: read answer to %s: %w", op, err)
	}
	var r Response
	if err := json.Unmarshal(resp, &r); err != nil {
		return fmt.Errorf("control: decode answer to %s: %w", op, err)
	}
	if r.Error != "" {
		return &Error{Message: r.Error, Hint: r.Hint, Code: r.Code, Kind: r.Kind}
	}
	if result != nil && len(r.Result) > 0 {
		if err := json.Unmarshal(r.Result, result); err != nil {
			return fmt.Errorf("control: decode result of %s: %w", op, err)
		}
	}
	return nil
}

// CallCancel is Call that gives up when cancel is closed: it hangs up, which
// cancels the handler's context in the daemon, and returns ErrCanceled
// without waiting for the answer. An answer that arrived first is returned
// as from Call.
func CallCancel(path, op string, args, result any, timeout time.Duration, cancel <-chan struct{}) error {
	c, err := Dial(path, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.Timeout = timeout
	finished := make(chan struct{})
	watched := make(chan bool) // whether the watcher hung up
	go func() {
		select {
		case <-cancel:
			c.Close()
			watched <- true
		case <-finished:
			watched <- false
		}
	}()
	err = c.Call(op, args, result)
	close(finished)
	if hungUp := <-watched; hungUp && err != nil {
		return fmt.Errorf("control: %s: %w", op, ErrCanceled)
	}
	return err
}

// Call dials path, makes one call and closes the connection.
func Call(path, op string, args, result any, timeout time.Duration) error {
	c, err := Dial(path, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.Timeout = timeout
	return c.Call(op, args, result)
}
