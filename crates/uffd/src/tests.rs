#![allow(clippy::unwrap_used)]

use super::*;

const PAGE: usize = 4096;

struct Map {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; tests coordinate access through userfaultfd.
unsafe impl Send for Map {}
// SAFETY: as above.
unsafe impl Sync for Map {}

impl Map {
    fn new(pages: usize) -> Map {
        let len = pages * PAGE;
        // SAFETY: a fresh private anonymous mapping, unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Map { ptr: p.cast(), len }
    }
    fn addr(&self, page: usize) -> u64 {
        self.ptr as u64 + (page * PAGE) as u64
    }
    fn write(&self, page: usize, v: u8) {
        assert!(page * PAGE < self.len);
        // SAFETY: inside the mapping; volatile so the store really happens.
        unsafe { self.ptr.add(page * PAGE).write_volatile(v) }
    }
    fn read(&self, page: usize) -> u8 {
        assert!(page * PAGE < self.len);
        // SAFETY: inside the mapping.
        unsafe { self.ptr.add(page * PAGE).read_volatile() }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A userfaultfd with `features`. Always `Some`: the tests are ignored
/// under the `no_uffd` cfg (build.rs), and one that runs fails without it.
fn uffd(features: u64) -> Option<Uffd> {
    match Uffd::new(features) {
        Ok(u) => Some(u),
        Err(e) => panic!("this test needs userfaultfd, and the build found it usable: {e}"),
    }
}

/// Serve faults on `u` until `n` were handled: for write-protect faults,
/// record the page's old first byte, then unprotect that page.
fn serve(u: &Uffd, map: &Map, n: usize) -> Vec<(usize, u8)> {
    let mut seen = Vec::new();
    let mut ev = [Event::Other(0); 8];
    while seen.len() < n {
        let _ = poll2(u.as_raw_fd(), u.as_raw_fd(), 1000).unwrap();
        let k = u.read_events(&mut ev).unwrap();
        for e in &ev[..k] {
            if let Event::Fault { addr, write, wp } = *e {
                assert!(write && wp, "{e:?}");
                let page = ((addr - map.ptr as u64) / PAGE as u64) as usize;
                seen.push((page, map.read(page)));
                u.unprotect(map.addr(page), PAGE as u64, true).unwrap();
            }
        }
    }
    seen
}

#[test]
#[cfg_attr(no_uffd, ignore = "needs userfaultfd")]
fn write_protect_faults_before_the_write_lands() {
    let Some(u) = uffd(feature::PAGEFAULT_FLAG_WP | feature::WP_UNPOPULATED) else {
        return;
    };
    let map = std::sync::Arc::new(Map::new(8));
    map.write(2, 7);
    u.register(map.addr(0), map.len as u64, Mode::WriteProtect).unwrap();
    // Page 2 was populated; page 5 never was, and is protected all the same.
    u.protect(map.addr(0), map.len as u64).unwrap();
    let m = map.clone();
    let writer = std::thread::spawn(move || {
        m.write(2, 9);
        m.write(5, 3);
    });
    let seen = serve(&u, &map, 2);
    writer.join().unwrap();
    assert_eq!(seen, vec![(2, 7), (5, 0)], "the handler sees the old contents");
    assert_eq!((map.read(2), map.read(5)), (9, 3));
    // Unprotected pages no longer fault.
    map.write(2, 1);
    let mut ev = [Event::Other(0); 1];
    assert_eq!(u.read_events(&mut ev).unwrap(), 0);
}

#[test]
#[cfg_attr(no_uffd, ignore = "needs userfaultfd")]
fn missing_pages_are_served_by_copy_and_zeropage() {
    let Some(u) = uffd(0) else {
        return;
    };
    let map = std::sync::Arc::new(Map::new(4));
    u.register(map.addr(0), map.len as u64, Mode::Missing).unwrap();
    let m = map.clone();
    let reader = std::thread::spawn(move || (m.read(1), m.read(3)));
    let src = vec![0x5au8; PAGE];
    let mut served = 0;
    let mut ev = [Event::Other(0); 4];
    while served < 2 {
        let _ = poll2(u.as_raw_fd(), u.as_raw_fd(), 1000).unwrap();
        let k = u.read_events(&mut ev).unwrap();
        for e in &ev[..k] {
            if let Event::Fault { addr, wp: false, .. } = *e {
                if addr == map.addr(1) {
                    // SAFETY: `src` is one readable page.
                    unsafe { u.copy(addr, src.as_ptr(), PAGE as u64, false) }.unwrap();
                } else {
                    u.zeropage(addr, PAGE as u64).unwrap();
                }
                served += 1;
            }
        }
    }
    assert_eq!(reader.join().unwrap(), (0x5a, 0));
    // A second installation at the same page is not an error.
    // SAFETY: `src` is one readable page.
    unsafe { u.copy(map.addr(1), src.as_ptr(), PAGE as u64, false) }.unwrap();
}

#[test]
#[cfg_attr(no_uffd, ignore = "needs userfaultfd")]
fn bad_ranges_name_the_operation() {
    let Some(u) = uffd(feature::PAGEFAULT_FLAG_WP) else {
        return;
    };
    let e = u.protect(4096 * 3, 4096).unwrap_err().to_string();
    assert!(e.contains("UFFDIO_WRITEPROTECT") && e.contains("0x3000"), "{e}");
}

/// Which pages of `map` are mapped (mincore): a page still missing is not,
/// and looking does not fault it in.
fn present(map: &Map) -> Vec<bool> {
    let mut v = vec![0u8; map.len / PAGE];
    // SAFETY: `v` has one byte per page of the mapping, which is page aligned.
    let r = unsafe { libc::mincore(map.ptr.cast(), map.len, v.as_mut_ptr()) };
    assert_eq!(r, 0, "{}", io::Error::last_os_error());
    v.iter().map(|b| b & 1 != 0).collect()
}

/// A registered 8-page mapping with page 3 already installed (value 0x33).
fn with_page_three(u: &Uffd) -> Map {
    let map = Map::new(8);
    u.register(map.addr(0), map.len as u64, Mode::Missing).unwrap();
    let one = vec![0x33u8; PAGE];
    // SAFETY: `one` is one readable page.
    unsafe { u.copy(map.addr(3), one.as_ptr(), PAGE as u64, false) }.unwrap();
    assert_eq!(present(&map), [false, false, false, true, false, false, false, false]);
    map
}

/// All of `map` is present, and reads `v` except page 3 (0x33); checked
/// after unregistering, so a page left missing would read as zero, not hang.
fn check_filled(u: &Uffd, map: &Map, v: u8) {
    assert_eq!(present(map), vec![true; 8], "every page installed");
    u.unregister(map.addr(0), map.len as u64).unwrap();
    let got: Vec<u8> = (0..8).map(|p| map.read(p)).collect();
    let want: Vec<u8> = (0..8).map(|p| if p == 3 { 0x33 } else { v }).collect();
    assert_eq!(got, want, "first byte of each page");
}

#[test]
#[cfg_attr(no_uffd, ignore = "needs userfaultfd")]
fn copy_over_a_present_page_installs_the_rest_of_the_range() {
    let Some(u) = uffd(0) else {
        return;
    };
    let map = with_page_three(&u);
    // The kernel copies pages 0-2, stops at page 3 (EAGAIN, 3 pages done),
    // then refuses page 3 (EEXIST); pages 4-7 must still arrive.
    let src = vec![0x5au8; map.len];
    // SAFETY: `src` is readable for the whole range.
    unsafe { u.copy(map.addr(0), src.as_ptr(), map.len as u64, false) }.unwrap();
    check_filled(&u, &map, 0x5a);
}

#[test]
#[cfg_attr(no_uffd, ignore = "needs userfaultfd")]
fn zeropage_over_a_present_page_installs_the_rest_of_the_range() {
    let Some(u) = uffd(0) else {
        return;
    };
    let map = with_page_three(&u);
    u.zeropage(map.addr(0), map.len as u64).unwrap();
    check_filled(&u, &map, 0);
}

#[test]
#[cfg_attr(no_uffd, ignore = "needs userfaultfd")]
fn a_copy_cut_short_goes_on_from_where_it_stopped() {
    let Some(u) = uffd(0) else {
        return;
    };
    let map = Map::new(8);
    u.register(map.addr(0), map.len as u64, Mode::Missing).unwrap();
    let src: Vec<u8> = (0..map.len).map(|i| (i / PAGE) as u8 + 0x40).collect();
    // Cut after 2 pages: the retry must start at page 2, not at page 0
    // (which is present now: EEXIST there would end the copy).
    u.cut_next_copy(2 * PAGE as u64);
    // SAFETY: `src` is readable for the whole range.
    unsafe { u.copy(map.addr(0), src.as_ptr(), map.len as u64, false) }.unwrap();
    assert_eq!(present(&map), vec![true; 8], "every page installed");
    u.unregister(map.addr(0), map.len as u64).unwrap();
    for p in 0..8 {
        assert_eq!(map.read(p), p as u8 + 0x40, "page {p}");
    }
}
