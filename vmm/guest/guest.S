/*
 * The built-in test guest: a 2 KiB disk image whose first sector is a boot sector.
 *
 * Entry contract (the same under our vmm and under QEMU + SeaBIOS): the first sector is
 * loaded at 0x7c00 and entered in real mode, CS=0, IP=0x7c00. vmm loads the whole image
 * there; under a BIOS the boot sector reads sectors 2-4 to 0x7e00 with INT 13h (it checks
 * a marker first, so under vmm, which has no BIOS, nothing is read). The guest then goes
 * from real mode straight to long mode (identity map with 2 MiB pages of the first 4 GiB,
 * and of as many GiB beyond as the parameter block asks for)
 * and runs its workload at CPL 3, where kvm-pvm runs code natively. `out` faults at CPL 3
 * here, so a #GP handler at CPL 0 performs the faulting `out dx, al` or `out dx, eax` and
 * resumes after it; a `hlt` at CPL 3 makes the handler halt for good (idle). Nothing uses
 * interrupts.
 *
 * Workloads (parameter block at 0x7d80, patched by vmm and the bench; see params below):
 *   0 idle:  print "S", halt.
 *   1 fill:  write 0xa5 over [start, start+size), print "F", halt.
 *   2 dirty: pass after pass, write the pass number into the first 8 bytes of every page
 *            of the range, checking first that the page holds the previous pass number;
 *            optionally paced by rdtsc to `ticks per unit` (the patcher derives it from
 *            `rate` and `TSC kHz`). After each pass: store the pass number (status block)
 *            and print 'A' + pass % 16, or "!" if any page held a wrong value (counted in
 *            the status block). A page lost or left stale by a migration shows up within
 *            one pass.
 *   3 disk:  pass after pass, write every 4 KiB block of disk 0 (vmm's block device, see
 *            vmm/src/disk.rs) filled with the qword (block << 32 | pass), paced like dirty;
 *            from pass 2 on, read each block back first and check that it holds the
 *            previous pass's qword, so a block lost or left stale by a migration shows up
 *            within one pass; a wrong block, or a request the device does not complete,
 *            counts as a mismatch. A letter per pass as above.
 *   4 mixed: each pass does a dirty pass over the range, then a disk pass.
 *
 * Memory used: 0x500 TSS, 0x600 IDT, 0x1000 PML4, 0x2000 PDPT, 0x3000-0x6fff page
 * directories, 0x7000-0x7bff kernel stack, 0x7c00-0x83ff this image, 0x8400-0x87ff user
 * stack, 0x8800 the disk request block, 0x9000-0x9fff the disk buffer, from 0x10000 the
 * page directories of the GiBs beyond 4 (one 4 KiB page each). The workload range must
 * start at or above 1 MiB. It counts RAM, not addresses: RAM from the hole's start on
 * (3 GiB, as on QEMU's pc machine with more than 3.5 GiB) is at 4 GiB and above, and the
 * range skips the hole.
 *
 * Regenerate guest.bin with `cargo xtask guest`.
 */
        .intel_syntax noprefix

        .set TSS, 0x500
        .set IDT, 0x600
        .set PML4, 0x1000
        .set PDPT, 0x2000
        .set PD, 0x3000
        .set HIGH_PD, 0x10000           /* page directories beyond 4 GiB */
        .set KSTACK, 0x7c00
        .set USTACK, 0x8800
        .set REQ, 0x8800
        .set BUF, 0x9000
        .set SERIAL, 0x3f8
        .set SECTORS, 3                 /* sectors after the boot sector */

        .set KCODE, 0x08
        .set UDATA, 0x10
        .set UCODE, 0x18
        .set TSSSEL, 0x20

        .text
        .code16
        .globl start
start:
        cli
        cld
        xor     ax, ax
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        mov     sp, KSTACK
        /* Under a BIOS only this sector is in memory: read the rest (DL = boot drive). */
        cmp     dword ptr [rest_marker], 0x5453524d   /* "MRST" */
        je      1f
        mov     ax, 0x0200 + SECTORS    /* read SECTORS sectors */
        mov     bx, 0x7e00
        mov     cx, 0x0002              /* cylinder 0, sector 2 */
        xor     dh, dh                  /* head 0 */
        int     0x13
1:
        /* Zero TSS, IDT and page tables (0x500-0x6fff). */
        xor     ax, ax
        mov     di, TSS
        mov     cx, (0x7000 - TSS) / 2
        rep stosw
        /* TSS: the CPL 0 stack. The I/O map offset stays 0: every port is denied, and a
         * user `out` must fault anyway. */
        mov     word ptr [TSS + 4], KSTACK
        /* IDT: vector 13 (#GP), a 64-bit interrupt gate to gp_handler. */
        mov     word ptr [IDT + 13 * 16], offset gp_handler
        mov     byte ptr [IDT + 13 * 16 + 2], KCODE
        mov     byte ptr [IDT + 13 * 16 + 5], 0x8e
        mov     word ptr [PML4], PDPT + 7
        /* PDPT: four page directories, for 4 GiB. */
        mov     di, PDPT
        mov     eax, PD + 7
        mov     cx, 4
2:      stosd                           /* low half; the high half is already zero */
        add     ax, 0x1000
        add     di, 4
        loop    2b
        /* Page directories: 2048 entries of 2 MiB, present, writable, user, large. */
        mov     di, PD
        mov     eax, 0x87
        mov     cx, 2048
3:      stosd
        add     eax, 0x200000
        add     di, 4
        loop    3b
        call    map_high
        lgdt    [gdtr]
        lidt    [idtr]                  /* a 32-bit base, still right in long mode */
        mov     eax, 0x20               /* CR4.PAE */
        mov     cr4, eax
        mov     eax, PML4
        mov     cr3, eax
        mov     ecx, 0xc0000080         /* EFER.LME */
        rdmsr
        or      ah, 1
        wrmsr
        mov     eax, 0x80000011         /* PG | ET | PE, caches on: real mode straight */
        mov     cr0, eax                /* to long mode */
        .byte   0xea                    /* ljmp KCODE:long_entry */
        .word   long_entry
        .word   KCODE

        .p2align 3
gdt:
        .quad   0
        .quad   0x00209a0000000000              /* 0x08 kernel code, 64-bit */
        .quad   0x0000f20000000000              /* 0x10 user data */
        .quad   0x0020fa0000000000              /* 0x18 user code, 64-bit */
        .quad   0x0000890000000067 + (TSS << 16) /* 0x20 TSS, 104 bytes */
        .quad   0
gdt_end:
gdtr:
        .word   gdt_end - gdt - 1
        .long   gdt
idtr:
        .word   14 * 16 - 1
        .long   IDT

/* ------------------------------------------------------------- parameter block
 * Patched by vmm and the bench (vmm/src/guest.rs describes the layout). */
        .org    0x180
params:
        .ascii  "MIGT"                          /* magic */
p_mode: .byte   2                               /* 0 idle, 1 fill, 2 dirty, 3 disk, 4 mixed */
        .byte   3                               /* parameter block version */
p_disk_port:
        .word   0x510                           /* port of disk 0 */
p_start:
        .quad   0x200000                        /* range start: 2 MiB */
p_size: .quad   0x4000000                       /* range size: 64 MiB */
p_rate: .long   0                               /* pages (blocks) per second; 0: full speed */
p_tsc_khz:
        .long   0                               /* TSC frequency in kHz */
p_ticks:
        .quad   0                               /* TSC ticks per unit: tsc_khz * 1000 / rate */
p_disk_blocks:
        .quad   0                               /* 4 KiB blocks of disk 0 */
s_pass: .quad   0                               /* status: passes completed */
s_mismatch:
        .quad   0                               /* status: pages found stale / failed I/O */
p_hole: .quad   0xc0000000                      /* where the 4 GiB hole starts (RAM goes on at 4 GiB) */
p_map_gib:
        .word   4                               /* GiB of addresses to map (at least 4) */
        .org    0x1fe
        .byte   0x55, 0xaa

/* ============================================================= sectors 2-4 */
/* Real mode: PDPT entries 4.. and their page directories (at HIGH_PD, one per GiB) for
 * the GiBs below p_map_gib: 512 entries of 2 MiB each, present, writable, user, large. */
map_high:
        mov     si, 4                           /* the GiB */
        mov     dx, HIGH_PD >> 4                /* its directory's segment */
1:      cmp     si, [p_map_gib]
        jae     3f
        /* PDPT entry: the directory's address | 7 (the high half is already zero). */
        movzx   ebx, si
        movzx   eax, dx
        shl     eax, 4
        or      eax, 7
        mov     [PDPT + ebx * 8], eax
        /* Entries: address (GiB << 30 | n << 21) | 0x87, split into two dwords. */
        mov     es, dx
        xor     di, di
        mov     ebp, ebx
        shr     ebp, 2                          /* high dword: GiB / 4 */
        shl     ebx, 30                         /* low dword of the GiB's address */
        or      ebx, 0x87
        mov     cx, 512
2:      mov     eax, ebx
        stosd
        mov     eax, ebp
        stosd
        add     ebx, 0x200000
        loop    2b
        inc     si
        add     dx, 0x100                       /* the next 4 KiB */
        jmp     1b
3:      xor     ax, ax
        mov     es, ax
        ret

        .code64
/* Data segment registers are ignored in long mode; SS is loaded by iretq. */
long_entry:
        mov     esp, KSTACK
        mov     ax, TSSSEL
        ltr     ax
        push    UDATA + 3
        push    USTACK
        push    2                               /* RFLAGS: interrupts off, IOPL 0 */
        push    UCODE + 3
        push    offset user_entry
        iretq

/* #GP at CPL 0: perform a user `out dx, al` or `out dx, eax` and skip it; anything else
 * (a user `hlt`) halts for good. User code keeps nothing in rsi. */
gp_handler:
        mov     rsi, [rsp + 8]                  /* faulting RIP */
        cmp     byte ptr [rsi], 0xee
        je      4f
        cmp     byte ptr [rsi], 0xef
        jne     6f
        out     dx, eax
        jmp     5f
4:      out     dx, al
5:      inc     qword ptr [rsp + 8]
        pop     rsi                             /* drop the error code */
        iretq
6:      hlt
        jmp     6b

/* ------------------------------------------------------------- CPL 3 */
user_entry:
        mov     al, 'S'
        call    putc
        mov     rdi, [rip + p_start]
        mov     rcx, [rip + p_size]
        mov     r8, [rip + p_ticks]             /* TSC ticks per unit; 0: unpaced */
        call    rdtsc64
        mov     r9, rax                         /* next deadline */
        mov     r14, [rip + s_pass]
        mov     bl, [rip + p_mode]
        cmp     bl, 1
        je      fill
        cmp     bl, 2
        jae     passes
idle:
        hlt                                     /* faults: the handler halts for good */

fill:
        mov     rdx, [rip + p_hole]
        lea     r12, [rdi + rcx]                /* the range's end, counted in RAM */
        cmp     r12, rdx
        jbe     1f
        sub     r12, rdx                        /* RAM beyond the hole's start... */
        mov     rcx, rdx
        sub     rcx, rdi
        mov     al, 0xa5
        rep stosb                               /* ...after the part below it */
        mov     rdi, 0x100000000
        mov     rcx, r12
1:      mov     al, 0xa5
        rep stosb
        mov     al, 'F'
        call    putc
        jmp     idle

/* dirty (2), disk (3), mixed (4): pass after pass over the range, the disk, or both. */
passes:
        mov     r10, rdi                        /* range start */
        lea     r11, [rdi + rcx]                /* range end, counted in RAM... */
        mov     rax, [rip + p_hole]
        cmp     r11, rax
        jbe     1f
        mov     rdx, 0x100000000
        sub     rdx, rax
        add     r11, rdx                        /* ...as an address past the hole */
1:      inc     r14
        xor     r15d, r15d                      /* mismatches this pass */
        cmp     bl, 3
        je      2f
        call    dirty_range
2:      cmp     bl, 2
        je      3f
        call    disk_all
3:      call    end_pass
        jmp     1b

/* Rewrites every page of the range with the pass number r14, checking first that it holds
   the previous one. */
dirty_range:
        mov     rdi, r10
4:      lea     rax, [r14 - 1]                  /* memory starts zeroed: pass 1 expects 0 */
        cmp     [rdi], rax
        je      7f
        inc     qword ptr [rip + s_mismatch]
        inc     r15d
7:      mov     [rdi], r14
        add     rdi, 4096
        cmp     rdi, [rip + p_hole]
        jne     8f
        mov     rdi, 0x100000000                /* over the hole */
8:      call    pace
        cmp     rdi, r11
        jb      4b
        ret

/* Rewrites every 4 KiB block of disk 0 with (block << 32 | pass r14), from pass 2 on
   reading it back first and checking it holds the previous pass's qword. */
disk_all:
        mov     r13, [rip + p_disk_blocks]
        xor     r12d, r12d                      /* block */
disk_block:
        cmp     r14, 1
        je      5f                              /* pass 1: the image holds anything */
        mov     dword ptr [REQ], 1              /* read the block back */
        call    disk_request
        mov     rax, r12
        shl     rax, 32
        lea     rax, [rax + r14 - 1]            /* what the previous pass wrote */
        cmp     qword ptr [BUF], rax
        jne     4f
        cmp     qword ptr [BUF + 4088], rax
        je      5f
4:      inc     qword ptr [rip + s_mismatch]
        inc     r15d
5:      mov     rax, r12
        shl     rax, 32
        or      rax, r14                        /* block << 32 | pass (pass < 2^32) */
        mov     edi, BUF
        mov     ecx, 512
        rep stosq
        mov     dword ptr [REQ], 2              /* write */
        call    disk_request
        inc     r12
        call    pace
        cmp     r12, r13
        jb      disk_block
        ret

/* Sends the request block (command set) for 4 KiB block r12 of disk 0 through BUF; a
   request the device does not complete counts as a mismatch. */
disk_request:
        mov     dword ptr [REQ + 4], 0          /* status: pending */
        lea     rax, [r12 * 8]
        mov     [REQ + 8], rax                  /* first sector */
        mov     dword ptr [REQ + 16], 8         /* sectors */
        mov     qword ptr [REQ + 24], BUF       /* guest buffer */
        mov     eax, REQ
        mov     dx, [rip + p_disk_port]
        out     dx, eax                         /* the device does the request */
        cmp     dword ptr [REQ + 4], 1          /* done? */
        je      6f
        inc     qword ptr [rip + s_mismatch]
        inc     r15d
6:      ret

/* After a pass: store its number, print its letter (or "!"). */
end_pass:
        mov     [rip + s_pass], r14
        mov     eax, r14d
        and     al, 15
        add     al, 'A'
        test    r15d, r15d
        jz      putc
        mov     al, '!'
putc:
        mov     dx, SERIAL
        out     dx, al                          /* faults to gp_handler, which does it */
        ret

/* Waits for the next deadline when paced (r8 ticks per unit, r9 the deadline). */
pace:
        test    r8, r8
        jz      10f
        add     r9, r8
9:      call    rdtsc64
        mov     rdx, rax
        sub     rdx, r9
        cmp     rdx, r8                         /* far behind (e.g. after a stop): */
        jle     91f                             /* do not catch up in a burst */
        mov     r9, rax
91:     cmp     rax, r9
        jb      9b
10:     ret

rdtsc64:
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        ret

        .org    0x7f8
rest_marker:
        .ascii  "MRST"                          /* the rest of the image is loaded */
        .long   0
