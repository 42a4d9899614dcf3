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
// is sent with its message only. ctx is canceled when the server closes, or
// when the client hangs up before the answer (see CallCancel): a long
// operation can stop then instead of finishing for no one.
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
		if !s.reply(c, w, s.call(c, r, req)) {
			return
		}
	}
}

// call runs the handler, turning a panic into an error response so one bad
// request cannot take the daemon (and the user's mounted disks) down.
func (s *Server) call(c net.Conn, r *bufio.Reader, req *Request) (resp Response) {
	defer func() {
		if p := recover(); p != nil {
			resp = Response{Error: fmt.Sprintf("internal error in %s: %v", req.Op, p), Code: 1}
		}
	}()
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	stop := watchHangup(c, r, cancel)
	defer stop()
	res, err := s.handler(ctx, req.Op, req.Args)
	if err != nil {
		return ErrorResponse(err)
	}
	b, err := json.Marshal(res)
	if err != nil {
		return Response{Error: fmt.Sprintf("control: encode result of %s: %v", req.Op, err), Code: 1}
	}
	return Response{Result: b}
}

// watchHangup calls cancel if the client hangs up while its call runs. It
// peeks at the connection, consuming nothing: a client sends nothing while
// it waits for an answer, so the peek returns only at a hangup (or with the
// next request of a client that pipelines, which is left for the serving
// loop). stop ends the watch and returns once it has ended, the connection
// the serving loop's again.
func watchHangup(c net.Conn, r *bufio.Reader, cancel func()) (stop func()) {
	c.SetReadDeadline(time.Time{}) // a call may run longer than IdleTimeout
	done := make(chan struct{})
	go func() {
		defer close(done)
		if _, err := r.Peek(1); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			cancel()
		}
	}()
	return func() {
		c.SetReadDeadline(time.Now()) // wakes the peek
		<-done
		c.SetReadDeadline(time.Time{})
	}
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
