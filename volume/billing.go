package volume

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"
	"strconv"
	"time"

	"github.com/encdisk/encdisk/snapshots"
	bolt "go.etcd.io/bbolt"
)

// Billing (SPEC section 3, the seed's 计费 table).
//
// What is free: encryption itself, the service key alias/acs/ecs, reads and
// writes, and everything done to unencrypted disks. What is counted: every
// management operation on an encrypted disk or snapshot (CreateDisk,
// AttachDisk, DetachDisk, CreateSnapshot, DeleteSnapshot, ResetDisk,
// ReInitDisk, ResizeDisk, DeleteDisk, and re-wrapping a data key) is recorded
// as KMS API calls in the volume's region, per operation and per CMK: one call
// on the disk's CMK, two (Decrypt then Encrypt) when a data key moves to
// another CMK. What is priced: calls on customer keys (BYOK included), and
// each customer key for every started day a disk or snapshot of the volume
// uses it. Calls on the service key are counted and priced at zero.
//
// The counts live in the "billing" bucket of meta.db and are written in the
// same transaction as the operation, so a crash never loses or doubles one.
// Prices and the balance are not stored: they come from config.toml each
// time, so a top-up takes effect at once.

// ErrBalance: the configured balance cannot cover an operation.
var ErrBalance = errors.New("insufficient balance")

// Kinds of CMK, for billing.
const (
	KeyService  = "service"  // alias/acs/ecs: free
	KeyCustomer = "customer" // origin kms: billed
	KeyBYOK     = "byok"     // origin external: billed
	// keyUnknown: a key the KMS could not describe yet (billed until it can).
	keyUnknown = "unknown"
)

// KeyDescriber is an optional interface of a KMS: what a key reference
// resolves to. The volume uses it to tell the free service key from billed
// customer keys, and to check a key before it charges for using it.
type KeyDescriber interface {
	// DescribeKey resolves keyRef (an id or alias; "" is the region's
	// service key) to the key's id and kind (KeyService, KeyCustomer or
	// KeyBYOK).
	DescribeKey(region, keyRef string) (id, kind string, err error)
}

// Billing holds the prices of config.toml's [billing] table.
type Billing struct {
	Currency        string   `json:"currency,omitempty"`
	PricePer10k     float64  `json:"price_per_10k_calls"` // per 10,000 KMS API calls on customer keys
	KeyPricePerDay  float64  `json:"key_price_per_day"`   // per customer key, per started day in use
	Balance         *float64 `json:"balance,omitempty"`   // nil: no limit
	BalanceFromFile string   `json:"-"`                   // where the balance is set, for messages
}

var bucketBilling = []byte("billing")

var billingStateKey = []byte("state")

// billState is the value of "state" in the billing bucket (JSON).
type billState struct {
	// Calls counts KMS API calls: operation → key id → calls.
	Calls map[string]map[string]uint64 `json:"calls"`
	// Keys are the CMKs the volume's disks and snapshots have used.
	Keys map[string]*keyUse `json:"keys"`
}

// keyUse is the billing record of one CMK.
type keyUse struct {
	Kind string `json:"kind"`
	// Since is when the current period of use began (zero: not in use).
	Since time.Time `json:"since,omitzero"`
	// UsedSeconds sums the periods of use that have ended.
	UsedSeconds int64 `json:"used_seconds,omitempty"`
}

func (k *keyUse) billed() bool { return k.Kind != KeyService }

// seconds in use up to now.
func (k *keyUse) seconds(now time.Time) int64 {
	s := k.UsedSeconds
	if !k.Since.IsZero() && now.After(k.Since) {
		s += int64(now.Sub(k.Since) / time.Second)
	}
	return s
}

// days charged: every started day of use.
func (k *keyUse) days(now time.Time) int64 {
	if !k.Since.IsZero() || k.UsedSeconds > 0 {
		return k.seconds(now)/86400 + 1
	}
	return 0
}

func readBillState(tx *bolt.Tx) (*billState, error) {
	st := &billState{Calls: map[string]map[string]uint64{}, Keys: map[string]*keyUse{}}
	b := tx.Bucket(bucketBilling)
	if b == nil {
		return st, nil
	}
	val := b.Get(billingStateKey)
	if val == nil {
		return st, nil
	}
	if err := json.Unmarshal(val, st); err != nil {
		return nil, fmt.Errorf("volume: damaged billing record: %w", err)
	}
	if st.Calls == nil {
		st.Calls = map[string]map[string]uint64{}
	}
	if st.Keys == nil {
		st.Keys = map[string]*keyUse{}
	}
	return st, nil
}

func (v *Volume) loadBillState() (*billState, error) {
	var st *billState
	err := v.db.View(func(tx *bolt.Tx) error {
		var err error
		st, err = readBillState(tx)
		return err
	})
	return st, err
}

// billing returns the configured prices (zero prices when none).
func (v *Volume) billing() (*Billing, error) {
	if v.opts.Billing == nil {
		return &Billing{}, nil
	}
	b, err := v.opts.Billing()
	if err != nil {
		return nil, fmt.Errorf("volume: billing settings: %w", err)
	}
	if b == nil {
		b = &Billing{}
	}
	return b, nil
}

// spent is what st has cost so far at prices p.
func (st *billState) spent(p *Billing, now time.Time) (calls, keys float64) {
	for _, byKey := range st.Calls {
		for id, n := range byKey {
			if k := st.Keys[id]; k == nil || k.billed() {
				calls += float64(n) * p.PricePer10k / 10000
			}
		}
	}
	for _, k := range st.Keys {
		if k.billed() {
			keys += float64(k.days(now)) * p.KeyPricePerDay
		}
	}
	return calls, keys
}

// freeOfBalance are the operations a short balance never refuses: they are
// counted, but refusing them would keep a user who ran out from deleting
// what costs money (an attached disk must be detached first).
var freeOfBalance = map[string]bool{"DetachDisk": true, "DeleteDisk": true, "DeleteSnapshot": true}

// keyCall is one KMS API call of an operation: on key ref (an id, or an
// alias to resolve; "" the service key).
type keyCall struct {
	ref   string
	calls uint64
	// recorded: ref is the key id of an existing disk or snapshot. If the
	// KMS cannot say what kind of key it is (no keystore to hand), it is
	// billed as a customer key rather than refusing, say, a detach.
	recorded bool
}

// pendingBill is an operation's charge, checked against the balance and
// waiting to be written with the operation.
type pendingBill struct {
	v     *Volume
	st    *billState
	now   time.Time
	op    string
	calls map[string]uint64 // key id → calls
}

// keyKind resolves ref to a key id and kind: from the billing record when the
// key is known, else from the KMS.
func (v *Volume) keyKind(st *billState, ref string) (id, kind string, err error) {
	if k := st.Keys[ref]; k != nil && k.Kind != keyUnknown {
		return ref, k.Kind, nil
	}
	km, err := v.getKMS()
	if err != nil {
		return "", "", err
	}
	kd, ok := km.(KeyDescriber)
	if !ok {
		// A KMS that cannot say: bill the key as a customer key.
		return ref, KeyCustomer, nil
	}
	return kd.DescribeKey(v.hdr.Region, ref)
}

// charge prepares the KMS API calls of an operation on an encrypted disk or
// snapshot (nothing for calls == nil) and refuses it, before anything
// changes, when a configured balance cannot cover its cost. what names the
// operation's object for the message.
func (v *Volume) charge(op, what string, calls ...keyCall) (*pendingBill, error) {
	if len(calls) == 0 {
		return nil, nil
	}
	st, err := v.loadBillState()
	if err != nil {
		return nil, err
	}
	p, err := v.billing()
	if err != nil {
		return nil, err
	}
	pb := &pendingBill{v: v, st: st, now: time.Now().UTC().Truncate(time.Second), op: op, calls: map[string]uint64{}}
	cost := 0.0
	newDay := map[string]bool{} // keys whose first day cost counts
	for _, c := range calls {
		id, kind, err := v.keyKind(st, c.ref)
		if err != nil && c.recorded {
			v.logf("billing: key %s: %v (billed as a customer key until it can be described)", c.ref, err)
			id, kind, err = c.ref, keyUnknown, nil
		}
		if err != nil {
			return nil, fmt.Errorf("volume: %s %s: %w", op, what, err)
		}
		k := st.Keys[id]
		if k == nil {
			k = &keyUse{Kind: kind}
			st.Keys[id] = k
		} else if k.Kind == keyUnknown {
			k.Kind = kind
		}
		pb.calls[id] += c.calls
		if k.billed() {
			cost += float64(c.calls) * p.PricePer10k / 10000
			// A key coming into use for the first time starts its
			// first day. Days count the time a key is in use in all,
			// so a key used before has paid for the day it is in, and
			// a recorded key is that of a disk, snapshot or image
			// (of this volume, already in use; or, for an image
			// copied in, of the source volume, which pays for it).
			if !c.recorded && k.days(pb.now) == 0 && !newDay[id] {
				newDay[id] = true
				cost += p.KeyPricePerDay
			}
		}
	}
	if p.Balance != nil && cost > 0 && !freeOfBalance[op] {
		c, k := st.spent(p, pb.now)
		left := *p.Balance - c - k
		if cost > left+1e-9 {
			where := "config.toml"
			if p.BalanceFromFile != "" {
				where = p.BalanceFromFile
			}
			return nil, fmt.Errorf("volume: %w: %s of %s costs %s, balance %s (%s configured, %s spent); top up [billing] balance in %s",
				ErrBalance, op, what, p.money(cost), p.money(left), p.money(*p.Balance), p.money(c+k), where)
		}
	}
	return pb, nil
}

// money formats an amount: 2 decimals, more for amounts below a cent.
func (p *Billing) money(x float64) string {
	x = math.Round(x*1e6) / 1e6
	s := strconv.FormatFloat(x, 'f', 2, 64)
	if x != 0 && math.Abs(x) < 0.01 {
		s = strconv.FormatFloat(x, 'f', -1, 64)
	}
	if p.Currency != "" {
		s += " " + p.Currency
	}
	return s
}

// commit writes the charge inside the operation's transaction. inUse is the
// set of key ids the volume's disks and snapshots use once the operation is
// done: keys leaving it stop accruing days, keys entering it start.
func (pb *pendingBill) commit(tx *bolt.Tx, inUse map[string]bool) error {
	if pb == nil {
		return nil
	}
	st := pb.st
	byKey := st.Calls[pb.op]
	if byKey == nil {
		byKey = map[string]uint64{}
		st.Calls[pb.op] = byKey
	}
	for id, n := range pb.calls {
		byKey[id] += n
	}
	return st.settle(tx, pb.now, inUse)
}

// settleUse ends, for an operation that makes no KMS call (DeleteImage),
// the periods of use of the keys it leaves unused. Call it inside the
// operation's transaction, with the set evaluated as for commit.
func settleUse(tx *bolt.Tx, inUse map[string]bool) error {
	st, err := readBillState(tx)
	if err != nil {
		return err
	}
	return st.settle(tx, time.Now().UTC().Truncate(time.Second), inUse)
}

// settle starts the periods of use of the keys entering inUse, ends those
// of the keys leaving it, and writes st in tx.
func (st *billState) settle(tx *bolt.Tx, now time.Time, inUse map[string]bool) error {
	for id, k := range st.Keys {
		switch {
		case inUse[id] && k.Since.IsZero():
			k.Since = now
		case !inUse[id] && !k.Since.IsZero():
			// A period that ends counts at least a second: it has
			// started a day, which stays charged.
			k.UsedSeconds = max(k.seconds(now), k.UsedSeconds+1)
			k.Since = time.Time{}
		}
	}
	val, err := json.Marshal(st)
	if err != nil {
		return err
	}
	b, err := tx.CreateBucketIfNotExists(bucketBilling)
	if err != nil {
		return err
	}
	return b.Put(billingStateKey, val)
}

// keysInUse is the set of key ids of the volume's encrypted disks,
// snapshots and images, leaving out the one with id skip and adding add.
// v.mu held.
func (v *Volume) keysInUse(skip string, add ...string) map[string]bool {
	m := map[string]bool{}
	for _, d := range v.disks {
		if d.rec.Encrypted && d.rec.ID != skip {
			m[d.rec.KMSKeyID] = true
		}
	}
	for _, s := range v.snaps {
		if s.rec.Encrypted && s.rec.ID != skip {
			m[s.rec.KMSKeyID] = true
		}
	}
	for _, im := range v.images {
		if im.rec.Encrypted && im.rec.ID != skip {
			m[im.rec.KMSKeyID] = true
		}
	}
	for _, id := range add {
		if id != "" {
			m[id] = true
		}
	}
	return m
}

// diskCall is the one KMS API call of a management operation on disk r
// (none for an unencrypted disk).
func diskCall(r *diskRecord) []keyCall {
	if !r.Encrypted {
		return nil
	}
	return []keyCall{{ref: r.KMSKeyID, calls: 1, recorded: true}}
}

// chargeDisk is charge for an operation on the existing disk d. v.mu held.
func (v *Volume) chargeDisk(op string, d *disk) (*pendingBill, error) {
	return v.charge(op, "disk "+d.rec.Name, diskCall(&d.rec)...)
}

// billExtra returns Apply's extra function: the operation's own writes (may
// be nil) then its charge. inUse is evaluated inside the transaction.
func billExtra(pb *pendingBill, inUse func() map[string]bool, extra func(tx *bolt.Tx) error) func(tx *bolt.Tx) error {
	if pb == nil {
		return extra
	}
	return func(tx *bolt.Tx) error {
		if extra != nil {
			if err := extra(tx); err != nil {
				return err
			}
		}
		return pb.commit(tx, inUse())
	}
}

// BillingReport is what `encdisk billing` shows, for the volume's region.
type BillingReport struct {
	Region   string         `json:"region"`
	Currency string         `json:"currency,omitempty"`
	Prices   Billing        `json:"prices"`
	Calls    []BillingCalls `json:"calls"`
	Keys     []BilledKey    `json:"keys"`
	// TotalCalls counts every recorded KMS API call; BilledCalls those on
	// customer keys.
	TotalCalls  uint64   `json:"total_calls"`
	BilledCalls uint64   `json:"billed_calls"`
	CallsCost   float64  `json:"calls_cost"`
	KeysCost    float64  `json:"keys_cost"`
	Total       float64  `json:"total"`
	Balance     *float64 `json:"balance,omitempty"` // configured
	Remaining   *float64 `json:"remaining,omitempty"`
}

// BillingCalls is the count of one operation's KMS API calls on one key.
type BillingCalls struct {
	Operation string  `json:"operation"`
	KeyID     string  `json:"key_id"`
	KeyKind   string  `json:"key_kind"`
	Calls     uint64  `json:"calls"`
	Cost      float64 `json:"cost"`
}

// BilledKey is a CMK the volume has used.
type BilledKey struct {
	KeyID  string  `json:"key_id"`
	Kind   string  `json:"kind"`
	InUse  bool    `json:"in_use"` // by a disk or snapshot now
	Billed bool    `json:"billed"` // customer and BYOK keys; the service key is free
	Days   int64   `json:"days"`   // started days of use so far
	Cost   float64 `json:"cost"`
	Calls  uint64  `json:"calls"`
}

// Billing reports the KMS API calls recorded for the volume's region, the
// keys its disks and snapshots use, and their cost at the configured prices.
func (v *Volume) Billing() (*BillingReport, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return nil, errors.New("volume: closed")
	}
	st, err := v.loadBillState()
	if err != nil {
		return nil, err
	}
	p, err := v.billing()
	if err != nil {
		return nil, err
	}
	now := time.Now().UTC()
	rep := &BillingReport{Region: v.hdr.Region, Currency: p.Currency, Prices: *p, Calls: []BillingCalls{}, Keys: []BilledKey{}}
	inUse := v.keysInUse("")
	perKey := map[string]uint64{}
	for op, byKey := range st.Calls {
		for id, n := range byKey {
			kind := KeyCustomer
			if k := st.Keys[id]; k != nil {
				kind = k.Kind
			}
			c := BillingCalls{Operation: op, KeyID: id, KeyKind: kind, Calls: n}
			rep.TotalCalls += n
			perKey[id] += n
			if kind != KeyService {
				c.Cost = float64(n) * p.PricePer10k / 10000
				rep.BilledCalls += n
				rep.CallsCost += c.Cost
			}
			rep.Calls = append(rep.Calls, c)
		}
	}
	sort.Slice(rep.Calls, func(i, j int) bool {
		if rep.Calls[i].Operation != rep.Calls[j].Operation {
			return rep.Calls[i].Operation < rep.Calls[j].Operation
		}
		return rep.Calls[i].KeyID < rep.Calls[j].KeyID
	})
	for id, k := range st.Keys {
		bk := BilledKey{KeyID: id, Kind: k.Kind, InUse: inUse[id], Billed: k.billed(), Calls: perKey[id]}
		if k.billed() {
			bk.Days = k.days(now)
			bk.Cost = float64(bk.Days) * p.KeyPricePerDay
			rep.KeysCost += bk.Cost
		}
		rep.Keys = append(rep.Keys, bk)
	}
	sort.Slice(rep.Keys, func(i, j int) bool { return rep.Keys[i].KeyID < rep.Keys[j].KeyID })
	rep.Total = rep.CallsCost + rep.KeysCost
	if p.Balance != nil {
		b, left := *p.Balance, *p.Balance-rep.Total
		rep.Balance, rep.Remaining = &b, &left
	}
	return rep, nil
}

// createCalls are the KMS API calls of CreateDisk: GenerateDataKey for a new
// encrypted disk; Decrypt of the source's data key for a disk from an
// encrypted snapshot or image, and Encrypt when it moves to another key.
func createCalls(src *snapshot, o *CreateDiskOptions) []keyCall {
	switch {
	case src != nil && src.rec.Encrypted:
		calls := []keyCall{{ref: src.rec.KMSKeyID, calls: 1, recorded: true}}
		if o.KMSKeyID != "" {
			calls = append(calls, keyCall{ref: o.KMSKeyID, calls: 1})
		}
		return calls
	case src == nil && o.Encrypted:
		return []keyCall{{ref: o.KMSKeyID, calls: 1}}
	}
	return nil
}

// updateBilled is update with the operation's charge in the same commit.
// v.mu held.
func (v *Volume) updateBilled(d *disk, pb *pendingBill, f func(r *diskRecord)) error {
	if pb == nil {
		return v.update(d, f)
	}
	r := d.current()
	f(&r)
	if err := v.st.Apply(func(*snapshots.Tx) error { return nil },
		billExtra(pb, func() map[string]bool { return v.keysInUse("") },
			func(tx *bolt.Tx) error { return v.putRecord(tx, &r) })); err != nil {
		return err
	}
	d.setRec(r)
	return nil
}

// snapCall is the one KMS API call of an operation on snapshot r.
func snapCall(r *snapRecord) []keyCall {
	if !r.Encrypted {
		return nil
	}
	return []keyCall{{ref: r.KMSKeyID, calls: 1, recorded: true}}
}
