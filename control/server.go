package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"
)

// Handler serves one request. A returned *Error is sent as is; any other error
// is sent with its message only.
type Handler func(ctx context.Context, op string, args json.RawMessage) (any, error)

// Server answers requests on a Unix socket.
type Server struct {
	ln      net.Listener
	path    string
	handler Handler
	ctx     context.Context
	cancel  context.CancelFunc

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup

	// IdleTimeout closes a connection that sends nothing for this long.
	IdleTimeout time.Duration
}

// Listen creates the socket file at path (mode 0600; path must not exist) and
// returns a server that is not yet serving.
func Listen(path string, h Handler) (*Server, error) {
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control: listen on %s: %w", path, err)
	}
	// Tighten before anyone can have raced in: the daemon also runs with
	// umask 077, so the window is only for callers that do not.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control: %w", err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(true)
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{
		ln: ln, path: path, handler: h, ctx: ctx, cancel: cancel,
		conns:       map[net.Conn]struct{}{},
		IdleTimeout: 10 * time.Minute,
	}, nil
}

// Path is the socket's path.
func (s *Server) Path() string { return s.path }

// Serve accepts connections until Close. It returns nil after Close.
func (s *Server) Serve() error {
	var delay time.Duration
	for {
		c, err := s.ln.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			// EMFILE and friends: back off rather than spin.
			if delay == 0 {
				delay = 5 * time.Millisecond
			} else if delay < time.Second {
				delay *= 2
			}
			time.Sleep(delay)
			continue
		}
		delay = 0
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return nil
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.serveConn(c)
	}
}

// Close stops accepting, closes open connections once their current request
// is answered, waits for the handlers and removes the socket file.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	err := s.ln.Close()
	for c := range s.conns {
		// Wake readers blocked between requests; a handler running now
		// still gets to write its answer (the write deadline is separate).
		c.SetReadDeadline(time.Now())
	}
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	return err
}

func (s *Server) serveConn(c net.Conn) {
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
		s.wg.Done()
	}()
	r := bufio.NewReaderSize(c, 64<<10)
	w := bufio.NewWriter(c)
	for {
		s.mu.Lock()
		closed := s.closed
		s.mu.Unlock()
		if closed {
			return
		}
		if s.IdleTimeout > 0 {
			c.SetReadDeadline(time.Now().Add(s.IdleTimeout))
		}
		line, err := readLine(r, MaxRequest)
		if err != nil {
			if errors.Is(err, ErrTooLarge) || errors.Is(err, ErrMalformed) {
				s.reply(c, w, Response{Error: "control: " + err.Error(), Code: 2})
			}
			return
		}
		req, err := DecodeRequest(line)
		if err != nil {
			s.reply(c, w, Response{Error: "control: " + err.Error(), Code: 2})
			return
		}
		if !s.reply(c, w, s.call(req)) {
			return
		}
	}
}

// call runs the handler, turning a panic into an error response so one bad
// request cannot take the daemon (and the user's mounted disks) down.
func (s *Server) call(req *Request) (resp Response) {
	defer func() {
		if p := recover(); p != nil {
			resp = Response{Error: fmt.Sprintf("internal error in %s: %v", req.Op, p), Code: 1}
		}
	}()
	res, err := s.handler(s.ctx, req.Op, req.Args)
	if err != nil {
		return ErrorResponse(err)
	}
	b, err := json.Marshal(res)
	if err != nil {
		return Response{Error: fmt.Sprintf("control: encode result of %s: %v", req.Op, err), Code: 1}
	}
	return Response{Result: b}
}

// ErrorResponse converts a handler's error to its wire form.
func ErrorResponse(err error) Response {
	var ce *Error
	if errors.As(err, &ce) {
		return Response{Error: ce.Message, Hint: ce.Hint, Code: ce.Code, Kind: ce.Kind}
	}
	return Response{Error: err.Error(), Code: 1}
}

func (s *Server) reply(c net.Conn, w *bufio.Writer, resp Response) bool {
	b, err := json.Marshal(resp)
	if err != nil {
		b, _ = json.Marshal(Response{Error: "control: encode response: " + err.Error(), Code: 1})
	}
	c.SetWriteDeadline(time.Now().Add(30 * time.Second))
	w.Write(b)
	w.WriteByte('\n')
	return w.Flush() == nil
}
