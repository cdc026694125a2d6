//! build: a compile-like workload with the memory behaviour of a compiler.
//!
//! For every "file" it generates pseudo-source, tokenizes it into a growing
//! token array, parses it into expression trees of small heap nodes, folds
//! constants, emits bytecode into a growing output buffer and interns every
//! identifier in a growing symbol table, then frees the per-file data. All of
//! it lives in a size-class heap inside the share's memory, addressed by word
//! offsets (never host pointers), so the final heap image is deterministic.
//!
//! When the heap runs out, the "compilation session" ends: the symbol table
//! and output are folded into the running checksum, the heap is reset and the
//! file is compiled again from scratch. This gives heap churn and a bursty
//! dirty set over a large heap, like the paper's Compilation workload.
//!
//! With `disk=on` the sources live on the disk and the objects go to it.
//! The share's disk area is split in halves. The first holds `src_slots`
//! source slots of [`source_slot_bytes`] each: a length word, then the
//! text. Before compiling, the share writes the sources of the first
//! `src_slots` files; file `f` is read from slot `f % src_slots` into the
//! heap, and once it is compiled the source of file `f + src_slots` takes
//! its slot. The second half is an object log: the code emitted for each
//! file (and whenever the output buffer fills) is appended, zero-padded to
//! whole sectors, wrapping to the start of the half when it does not fit.
//! Apart from where sources come from and that each file's output is
//! written out after it, compilation is the same as without the disk.

use crate::disk::{Disk, SECTOR, SECTOR_WORDS};
use crate::hash::hash_words;
use crate::rng::Rng;
use crate::{Env, Share};

/// Bytes of one source slot on the disk for files of `filesize` bytes: a
/// length word and the text (under `filesize` bytes), with room to spare,
/// rounded up to whole sectors.
pub(crate) fn source_slot_bytes(filesize: u64) -> u64 {
    (filesize + 16).next_multiple_of(SECTOR)
}

/// Heap exhausted: the current file is abandoned and retried on a fresh heap.
#[derive(Debug)]
struct Oom;

type R<T> = Result<T, Oom>;

const CLASSES: usize = 40;
const HDR_USED: u64 = 0x5553_4544 << 32;
const HDR_FREE: u64 = 0x4652_4545 << 32;

/// A segregated-fit heap over word offsets; offset 0 is never handed out.
struct Heap<'a> {
    mem: &'a mut [u64],
    bump: usize,
    free: [usize; CLASSES],
}

fn class_words(c: usize) -> usize {
    4usize << c
}

impl<'a> Heap<'a> {
    fn new(mem: &'a mut [u64]) -> Self {
        Heap {
            mem,
            bump: 1,
            free: [0; CLASSES],
        }
    }

    fn reset(&mut self) {
        self.bump = 1;
        self.free = [0; CLASSES];
    }

    fn alloc(&mut self, words: usize) -> R<usize> {
        let c = (0..CLASSES).find(|&c| class_words(c) >= words).ok_or(Oom)?;
        let hdr = self.free[c];
        if hdr != 0 {
            self.free[c] = self.mem[hdr + 1] as usize;
            self.mem[hdr] = HDR_USED | c as u64;
            return Ok(hdr + 1);
        }
        let need = 1 + class_words(c);
        if self.bump + need > self.mem.len() {
            return Err(Oom);
        }
        let hdr = self.bump;
        self.bump += need;
        self.mem[hdr] = HDR_USED | c as u64;
        Ok(hdr + 1)
    }

    fn free(&mut self, p: usize) {
        let hdr = p - 1;
        let c = (self.mem[hdr] & 0xff) as usize;
        self.mem[hdr] = HDR_FREE | c as u64;
        self.mem[p] = self.free[c] as u64;
        self.free[c] = hdr;
    }

    fn capacity(&self, p: usize) -> usize {
        class_words((self.mem[p - 1] & 0xff) as usize)
    }

    fn byte(&self, base: usize, i: usize) -> u8 {
        (self.mem[base + i / 8] >> ((i % 8) * 8)) as u8
    }

    fn set_byte(&mut self, base: usize, i: usize, b: u8) {
        let w = &mut self.mem[base + i / 8];
        let shift = (i % 8) * 8;
        *w = (*w & !(0xff << shift)) | (u64::from(b) << shift);
    }
}

/// A growable array of words in the heap.
#[derive(Clone, Copy)]
struct Arr {
    at: usize,
    len: usize,
}

impl Arr {
    fn new(h: &mut Heap<'_>, cap: usize) -> R<Arr> {
        Ok(Arr {
            at: h.alloc(cap)?,
            len: 0,
        })
    }

    fn push(&mut self, h: &mut Heap<'_>, v: u64) -> R<()> {
        let cap = h.capacity(self.at);
        if self.len == cap {
            let bigger = h.alloc(cap * 2)?;
            h.mem.copy_within(self.at..self.at + self.len, bigger);
            h.free(self.at);
            self.at = bigger;
        }
        h.mem[self.at + self.len] = v;
        self.len += 1;
        Ok(())
    }

    fn get(&self, h: &Heap<'_>, i: usize) -> u64 {
        h.mem[self.at + i]
    }
}

// Token kinds (low byte of a token word; the value sits above it).
const T_IDENT: u64 = 1;
const T_NUM: u64 = 2;
const T_LET: u64 = 3;
const T_FN: u64 = 4;
const T_RETURN: u64 = 5;
const T_PUNCT: u64 = 6;
const T_END: u64 = 7;

// AST node: 4 words [kind, a, b, value].
const N_NUM: u64 = 1;
const N_VAR: u64 = 2;
const N_BIN: u64 = 3;
const N_CALL: u64 = 4;
const N_LET: u64 = 5;
const N_FN: u64 = 6;

struct Compiler<'a> {
    heap: Heap<'a>,
    syms: Arr,
    sym_count: usize,
    out: Arr,
    out_limit: usize,
    sym_limit: usize,
    acc: u64,
    io: Option<Io<'a>>,
}

/// Where the sources and objects of `disk=on` live (sectors on the disk).
struct Io<'a> {
    disk: &'a mut dyn Disk,
    src_sector: u64,
    src_slots: u64,
    slot_words: usize,
    obj_sector: u64,
    obj_sectors: u64,
    obj_pos: u64,
    errors: u64,
}

/// Source text: bytes packed into heap words from `base`.
struct Text {
    base: usize,
    len: usize,
}

struct FileState {
    text: Text,
    toks: Arr,
    nodes: Arr,
    stmts: Arr,
    pos: usize,
}

impl<'a> Compiler<'a> {
    fn new(mem: &'a mut [u64], io: Option<Io<'a>>) -> R<Self> {
        let words = mem.len();
        let mut heap = Heap::new(mem);
        let syms = Self::new_table(&mut heap, 64)?;
        let out = Arr::new(&mut heap, 256)?;
        Ok(Compiler {
            heap,
            syms,
            sym_count: 0,
            out,
            out_limit: (words / 16).max(1024),
            sym_limit: (words / 8).max(1024),
            acc: 0,
            io,
        })
    }

    fn new_table(h: &mut Heap<'_>, entries: usize) -> R<Arr> {
        let at = h.alloc(entries * 2)?;
        h.mem[at..at + entries * 2].fill(0);
        Ok(Arr { at, len: entries * 2 })
    }

    /// End the session: fold everything into the checksum and start afresh.
    fn new_session(&mut self) -> R<()> {
        let h = &self.heap;
        self.acc = self.acc.rotate_left(13)
            ^ hash_words(1, &h.mem[self.syms.at..self.syms.at + self.syms.len])
            ^ hash_words(2, &h.mem[self.out.at..self.out.at + self.out.len]);
        self.heap.reset();
        self.syms = Self::new_table(&mut self.heap, 64)?;
        self.sym_count = 0;
        self.out = Arr::new(&mut self.heap, 256)?;
        Ok(())
    }

    fn intern(&mut self, key: u64) -> R<u64> {
        let key = key | 1;
        let slots = self.syms.len / 2;
        let mut i = (key as usize) & (slots - 1);
        loop {
            let at = self.syms.at + 2 * i;
            let k = self.heap.mem[at];
            if k == key {
                self.heap.mem[at + 1] += 1 << 32;
                return Ok(self.heap.mem[at + 1] & 0xffff_ffff);
            }
            if k == 0 {
                let id = self.sym_count as u64;
                self.heap.mem[at] = key;
                self.heap.mem[at + 1] = (1 << 32) | id;
                self.sym_count += 1;
                if self.sym_count * 2 > slots {
                    self.grow_table()?;
                }
                return Ok(id);
            }
            i = (i + 1) & (slots - 1);
        }
    }

    fn grow_table(&mut self) -> R<()> {
        let old = self.syms;
        if old.len * 2 > self.sym_limit {
            // A full module: write its symbols out and start a new table.
            self.acc ^= hash_words(3, &self.heap.mem[old.at..old.at + old.len]);
            self.heap.mem[old.at..old.at + old.len].fill(0);
            self.sym_count = 0;
            return Ok(());
        }
        let new = Self::new_table(&mut self.heap, old.len)?;
        let slots = new.len / 2;
        for j in 0..old.len / 2 {
            let k = self.heap.mem[old.at + 2 * j];
            if k == 0 {
                continue;
            }
            let v = self.heap.mem[old.at + 2 * j + 1];
            let mut i = (k as usize) & (slots - 1);
            while self.heap.mem[new.at + 2 * i] != 0 {
                i = (i + 1) & (slots - 1);
            }
            self.heap.mem[new.at + 2 * i] = k;
            self.heap.mem[new.at + 2 * i + 1] = v;
        }
        self.heap.free(old.at);
        self.syms = new;
        Ok(())
    }

    fn emit(&mut self, w: u64) -> R<()> {
        if self.out.len >= self.out_limit {
            // "Write the object file" and reuse the buffer.
            self.end_object();
        }
        self.out.push(&mut self.heap, w)
    }

    /// Write the output buffer out (to the disk's object log with
    /// `disk=on`), fold it into the checksum and empty it.
    fn end_object(&mut self) {
        let (at, n) = (self.out.at, self.out.len);
        if let Some(io) = self.io.as_mut() {
            // The buffer's capacity is a power of two of at least 256
            // words, so the padding to a whole sector fits in it.
            let padded = n.next_multiple_of(SECTOR_WORDS);
            self.heap.mem[at + n..at + padded].fill(0);
            let sectors = ((padded / SECTOR_WORDS) as u64).min(io.obj_sectors);
            if sectors > 0 {
                if io.obj_pos + sectors > io.obj_sectors {
                    io.obj_pos = 0;
                }
                let words = &self.heap.mem[at..at + sectors as usize * SECTOR_WORDS];
                if io.disk.write(io.obj_sector + io.obj_pos, words).is_err() {
                    io.errors += 1;
                }
                io.obj_pos += sectors;
            }
        }
        self.acc ^= hash_words(4, &self.heap.mem[at..at + n]);
        self.out.len = 0;
    }

    /// `disk=on`: generate the source of `file` and write it to its slot.
    fn store_source(&mut self, file: u64, seed: u64, filesize: usize) -> R<()> {
        let Some(slot_words) = self.io.as_ref().map(|io| io.slot_words) else {
            return Ok(());
        };
        let at = self.heap.alloc(slot_words)?;
        self.heap.mem[at..at + slot_words].fill(0);
        let mut rng = Rng::new(seed ^ file.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut text = Text { base: at + 1, len: 0 };
        self.generate(&mut text, &mut rng, filesize, 256 + file * 16);
        self.heap.mem[at] = text.len as u64;
        if let Some(io) = self.io.as_mut() {
            let sector = io.src_sector + (file % io.src_slots) * (slot_words / SECTOR_WORDS) as u64;
            if io.disk.write(sector, &self.heap.mem[at..at + slot_words]).is_err() {
                io.errors += 1;
            }
        }
        self.heap.free(at);
        Ok(())
    }

    /// `disk=on`: read the source of `file` from its slot into the heap
    /// block `at` (`slot_words` long).
    fn load_source(&mut self, file: u64, at: usize, filesize: usize) -> Text {
        let mut text = Text { base: at + 1, len: 0 };
        if let Some(io) = self.io.as_mut() {
            let sector = io.src_sector + (file % io.src_slots) * (io.slot_words / SECTOR_WORDS) as u64;
            let words = &mut self.heap.mem[at..at + io.slot_words];
            if io.disk.read(sector, words).is_err() {
                io.errors += 1;
                words[0] = 0;
            }
            text.len = words[0] as usize;
            if text.len > filesize {
                // Not a source this workload wrote: compile nothing.
                io.errors += 1;
                text.len = 0;
            }
        }
        text
    }

    fn compile_file(&mut self, file: u64, seed: u64, filesize: usize) -> R<()> {
        let mut rng = Rng::new(seed ^ file.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let slot_words = self.io.as_ref().map(|io| io.slot_words);
        let block = self.heap.alloc(slot_words.unwrap_or(filesize.div_ceil(8) + 1))?;
        let text = match slot_words {
            Some(_) => self.load_source(file, block, filesize),
            None => Text { base: block, len: 0 },
        };
        let mut st = FileState {
            text,
            toks: Arr::new(&mut self.heap, 64)?,
            nodes: Arr::new(&mut self.heap, 64)?,
            stmts: Arr::new(&mut self.heap, 16)?,
            pos: 0,
        };
        if slot_words.is_none() {
            let vocab = 256 + file * 16;
            self.generate(&mut st.text, &mut rng, filesize, vocab);
        }
        self.tokenize(&mut st)?;
        while st.toks.get(&self.heap, st.pos) & 0xff != T_END {
            let s = self.statement(&mut st)?;
            st.stmts.push(&mut self.heap, s as u64)?;
        }
        for i in 0..st.stmts.len {
            let s = st.stmts.get(&self.heap, i) as usize;
            self.fold(s);
            self.gen_code(s)?;
        }
        for i in 0..st.nodes.len {
            let n = st.nodes.get(&self.heap, i) as usize;
            self.heap.free(n);
        }
        self.heap.free(st.nodes.at);
        self.heap.free(st.stmts.at);
        self.heap.free(st.toks.at);
        self.heap.free(block);
        Ok(())
    }

    // ---- source generation ----

    fn put(&mut self, t: &mut Text, s: &[u8]) {
        for &b in s {
            self.heap.set_byte(t.base, t.len, b);
            t.len += 1;
        }
    }

    fn put_num(&mut self, t: &mut Text, mut n: u64, radix: u64) {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        loop {
            i -= 1;
            let d = (n % radix) as u8;
            buf[i] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
            n /= radix;
            if n == 0 {
                break;
            }
        }
        self.put(t, &buf[i..]);
    }

    fn put_ident(&mut self, t: &mut Text, rng: &mut Rng, vocab: u64) {
        self.put(t, b"s");
        let id = rng.below(vocab);
        self.put_num(t, id, 36);
    }

    fn gen_expr(&mut self, st: &mut Text, rng: &mut Rng, vocab: u64, depth: u32) {
        let choice = if depth == 0 { rng.below(2) } else { rng.below(6) };
        match choice {
            0 => {
                let n = rng.below(1000);
                self.put_num(st, n, 10);
            }
            1 => self.put_ident(st, rng, vocab),
            2 => {
                self.put(st, b"(");
                self.gen_expr(st, rng, vocab, depth - 1);
                self.put(st, b")");
            }
            3 => {
                self.put_ident(st, rng, vocab);
                self.put(st, b"(");
                self.gen_expr(st, rng, vocab, depth - 1);
                self.put(st, b", ");
                self.gen_expr(st, rng, vocab, depth - 1);
                self.put(st, b")");
            }
            _ => {
                self.gen_expr(st, rng, vocab, depth - 1);
                let op = b"+-*/%"[rng.below(5) as usize];
                self.put(st, &[b' ', op, b' ']);
                self.gen_expr(st, rng, vocab, depth - 1);
            }
        }
    }

    fn generate(&mut self, st: &mut Text, rng: &mut Rng, filesize: usize, vocab: u64) {
        // The longest statement at depth 3 is well under 512 bytes.
        while st.len + 512 < filesize {
            if rng.percent(15) {
                self.put(st, b"fn ");
                self.put_ident(st, rng, vocab);
                self.put(st, b"(a, b) { return ");
                self.gen_expr(st, rng, vocab, 3);
                self.put(st, b"; }\n");
            } else {
                self.put(st, b"let ");
                self.put_ident(st, rng, vocab);
                self.put(st, b" = ");
                self.gen_expr(st, rng, vocab, 3);
                self.put(st, b";\n");
            }
        }
    }

    // ---- tokenizer ----

    fn tokenize(&mut self, st: &mut FileState) -> R<()> {
        let mut i = 0;
        while i < st.text.len {
            let b = self.heap.byte(st.text.base, i);
            if b.is_ascii_whitespace() {
                i += 1;
            } else if b.is_ascii_digit() {
                let mut v = 0u64;
                while i < st.text.len && self.heap.byte(st.text.base, i).is_ascii_digit() {
                    v = v * 10 + u64::from(self.heap.byte(st.text.base, i) - b'0');
                    i += 1;
                }
                st.toks.push(&mut self.heap, T_NUM | v << 8)?;
            } else if b.is_ascii_alphabetic() {
                let start = i;
                let mut h = 0xcbf2_9ce4_8422_2325u64;
                while i < st.text.len && self.heap.byte(st.text.base, i).is_ascii_alphanumeric() {
                    h = (h ^ u64::from(self.heap.byte(st.text.base, i))).wrapping_mul(0x100_0000_01b3);
                    i += 1;
                }
                let word = |s: &[u8]| {
                    s.len() == i - start
                        && s.iter()
                            .enumerate()
                            .all(|(k, c)| self.heap.byte(st.text.base, start + k) == *c)
                };
                let tok = if word(b"let") {
                    T_LET
                } else if word(b"fn") {
                    T_FN
                } else if word(b"return") {
                    T_RETURN
                } else {
                    T_IDENT | (h >> 8) << 8
                };
                st.toks.push(&mut self.heap, tok)?;
            } else {
                st.toks.push(&mut self.heap, T_PUNCT | u64::from(b) << 8)?;
                i += 1;
            }
        }
        st.toks.push(&mut self.heap, T_END)
    }

    // ---- parser ----

    fn peek(&self, st: &FileState) -> u64 {
        st.toks.get(&self.heap, st.pos)
    }

    fn next(&self, st: &mut FileState) -> u64 {
        let t = self.peek(st);
        if t & 0xff != T_END {
            st.pos += 1;
        }
        t
    }

    fn is_punct(t: u64, c: u8) -> bool {
        t == T_PUNCT | u64::from(c) << 8
    }

    fn node(&mut self, st: &mut FileState, kind: u64, a: usize, b: usize, v: u64) -> R<usize> {
        let n = self.heap.alloc(4)?;
        self.heap.mem[n..n + 4].copy_from_slice(&[kind, a as u64, b as u64, v]);
        st.nodes.push(&mut self.heap, n as u64)?;
        Ok(n)
    }

    fn statement(&mut self, st: &mut FileState) -> R<usize> {
        let t = self.next(st);
        let kind = t & 0xff;
        let name = self.next(st);
        let sym = self.intern(name >> 8)?;
        if kind == T_FN {
            // fn name(a, b) { return expr; }
            while !Self::is_punct(self.peek(st), b'{') && self.peek(st) & 0xff != T_END {
                self.next(st);
            }
            self.next(st);
            self.next(st); // return
            let body = self.expr(st)?;
            while !Self::is_punct(self.next(st), b'}') && self.peek(st) & 0xff != T_END {}
            self.node(st, N_FN, body, 0, sym)
        } else {
            self.next(st); // '='
            let value = self.expr(st)?;
            self.next(st); // ';'
            self.node(st, N_LET, value, 0, sym)
        }
    }

    fn expr(&mut self, st: &mut FileState) -> R<usize> {
        let mut left = self.term(st)?;
        loop {
            let t = self.peek(st);
            if Self::is_punct(t, b'+') || Self::is_punct(t, b'-') {
                self.next(st);
                let right = self.term(st)?;
                left = self.node(st, N_BIN, left, right, t >> 8)?;
            } else {
                return Ok(left);
            }
        }
    }

    fn term(&mut self, st: &mut FileState) -> R<usize> {
        let mut left = self.factor(st)?;
        loop {
            let t = self.peek(st);
            if Self::is_punct(t, b'*') || Self::is_punct(t, b'/') || Self::is_punct(t, b'%') {
                self.next(st);
                let right = self.factor(st)?;
                left = self.node(st, N_BIN, left, right, t >> 8)?;
            } else {
                return Ok(left);
            }
        }
    }

    fn factor(&mut self, st: &mut FileState) -> R<usize> {
        let t = self.next(st);
        match t & 0xff {
            T_NUM => self.node(st, N_NUM, 0, 0, t >> 8),
            T_IDENT => {
                let sym = self.intern(t >> 8)?;
                if Self::is_punct(self.peek(st), b'(') {
                    self.next(st);
                    let a = self.expr(st)?;
                    self.next(st); // ','
                    let b = self.expr(st)?;
                    self.next(st); // ')'
                    self.node(st, N_CALL, a, b, sym)
                } else {
                    self.node(st, N_VAR, 0, 0, sym)
                }
            }
            _ if Self::is_punct(t, b'(') => {
                let e = self.expr(st)?;
                self.next(st); // ')'
                Ok(e)
            }
            _ => self.node(st, N_NUM, 0, 0, 0),
        }
    }

    // ---- constant folding and code generation ----

    fn fold(&mut self, n: usize) -> Option<u64> {
        let [kind, a, b, v] = [0, 1, 2, 3].map(|i| self.heap.mem[n + i]);
        match kind {
            N_NUM => Some(v),
            N_BIN => {
                let (x, y) = (self.fold(a as usize), self.fold(b as usize));
                let (x, y) = (x?, y?);
                let r = match v as u8 {
                    b'+' => x.wrapping_add(y),
                    b'-' => x.wrapping_sub(y),
                    b'*' => x.wrapping_mul(y),
                    b'/' if y != 0 => x / y,
                    b'%' if y != 0 => x % y,
                    _ => return None,
                };
                self.heap.mem[n..n + 4].copy_from_slice(&[N_NUM, 0, 0, r]);
                Some(r)
            }
            N_CALL => {
                self.fold(a as usize);
                self.fold(b as usize);
                None
            }
            N_LET | N_FN => {
                self.fold(a as usize);
                None
            }
            _ => None,
        }
    }

    fn gen_code(&mut self, n: usize) -> R<()> {
        let [kind, a, b, v] = [0, 1, 2, 3].map(|i| self.heap.mem[n + i]);
        match kind {
            N_BIN | N_CALL => {
                self.gen_code(a as usize)?;
                self.gen_code(b as usize)?;
            }
            N_LET | N_FN => self.gen_code(a as usize)?,
            _ => {}
        }
        self.emit(kind << 56 | (v & 0x00ff_ffff_ffff_ffff))
    }
}

pub(crate) fn run(share: &Share, mem: &mut [u64], env: &mut dyn Env, disk: Option<&mut dyn Disk>) -> (u64, u64, u64) {
    let filesize = share.spec.filesize as usize;
    let io = match disk {
        None => None,
        Some(disk) => {
            let slot_sectors = source_slot_bytes(share.spec.filesize) / SECTOR;
            let src_sectors = share.disk_bytes / 2 / SECTOR;
            let src_slots = src_sectors / slot_sectors;
            if src_slots == 0 {
                return (0, 0, 1);
            }
            Some(Io {
                disk,
                src_sector: share.disk_off / SECTOR,
                src_slots,
                slot_words: slot_sectors as usize * SECTOR_WORDS,
                obj_sector: share.disk_off / SECTOR + src_sectors,
                obj_sectors: share.disk_bytes / SECTOR - src_sectors,
                obj_pos: 0,
                errors: 0,
            })
        }
    };
    let src_slots = io.as_ref().map_or(0, |io| io.src_slots);
    let Ok(mut c) = Compiler::new(mem, io) else {
        return (0, 0, 1);
    };
    let mut errors = 0;
    // disk=on: the first sources, before the build starts.
    for file in 0..share.ops.min(src_slots) {
        if c.store_source(file, share.seed, filesize).is_err() {
            errors += 1;
        }
    }
    for file in 0..share.ops {
        if c.compile_file(file, share.seed, filesize).is_err() {
            // Out of heap: end the session and compile this file on a fresh heap.
            let retried = c
                .new_session()
                .and_then(|()| c.compile_file(file, share.seed, filesize));
            if retried.is_err() {
                errors += 1;
                if c.new_session().is_err() {
                    return (file + 1, c.acc, errors + share.ops - file - 1);
                }
            }
        }
        if c.io.is_some() {
            c.end_object();
            let next = file + src_slots;
            if next < share.ops && c.store_source(next, share.seed, filesize).is_err() {
                let retried = c
                    .new_session()
                    .and_then(|()| c.store_source(next, share.seed, filesize));
                if retried.is_err() {
                    errors += 1;
                }
            }
        }
        env.step(file + 1, file + 1);
    }
    let acc = c.acc ^ hash_words(5, &c.heap.mem[c.syms.at..c.syms.at + c.syms.len]);
    (share.ops, acc, errors + c.io.as_ref().map_or(0, |io| io.errors))
}
