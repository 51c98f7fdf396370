/*
 * The built-in test guest: a 512-byte boot sector.
 *
 * Entry contract (the same under our vmm and under QEMU + SeaBIOS): loaded at 0x7c00, real
 * mode, CS=0, IP=0x7c00. The guest goes from real mode straight to long mode (identity map
 * of the first 4 GiB with 2 MiB pages) and runs its workload at CPL 3, where kvm-pvm runs
 * code natively. `out` faults at CPL 3 here, so a #GP handler at CPL 0 performs the
 * faulting `out dx, al` and resumes after it; a `hlt` at CPL 3 makes the handler halt for
 * good (idle). Nothing uses interrupts.
 *
 * Workloads (parameter block at 0x7dbe, patched by vmm and the bench; see params below):
 *   0 idle:  print "S", halt.
 *   1 fill:  write 0xa5 over [start, start+size), print "F", halt.
 *   2 dirty: pass after pass, write the pass number into the first 8 bytes of every page
 *            of the range, checking first that the page holds the previous pass number
 *            (from the second pass on); optionally paced by rdtsc to `ticks per page`
 *            (the patcher derives it from `rate` pages/s and `TSC kHz`). After each pass:
 *            store the pass number (status block) and print 'A' + pass % 16, or "!" if
 *            any page held a wrong value (counted in the status block). A page lost or left
 *            stale by a migration shows up within one pass.
 *
 * Memory used: 0x500 TSS, 0x600 IDT, 0x1000 PML4, 0x2000 PDPT, 0x3000-0x6fff page
 * directories, 0x7000-0x7bff kernel stack, 0x7c00 this sector, 0x7e00-0x8fff user stack.
 * The workload range must start at or above 1 MiB.
 *
 * Regenerate guest.bin with `cargo xtask guest`.
 */
        .intel_syntax noprefix

        .set TSS, 0x500
        .set IDT, 0x600
        .set PML4, 0x1000
        .set PDPT, 0x2000
        .set PD, 0x3000
        .set KSTACK, 0x7c00
        .set USTACK, 0x9000
        .set SERIAL, 0x3f8

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
        /* Zero TSS, IDT and page tables (0x500-0x6fff). */
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
1:      stosd                           /* low half; the high half is already zero */
        add     ax, 0x1000
        add     di, 4
        loop    1b
        /* Page directories: 2048 entries of 2 MiB, present, writable, user, large. */
        mov     di, PD
        xor     eax, eax
        mov     al, 0x87
        mov     ch, 2048 >> 8           /* cl is 0 after the loop */
2:      stosd
        add     eax, 0x200000
        add     di, 4
        loop    2b
        lgdt    [gdt]
        lidt    [idtr]                  /* a 32-bit base, still right in long mode */
        mov     eax, 0x20               /* CR4.PAE */
        mov     cr4, eax
        mov     ah, PML4 >> 8           /* eax = 0x1020: CR3 ignores bit 5 */
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

/* #GP at CPL 0: perform a user `out dx, al` and skip it; anything else (a user `hlt`)
 * halts for good. User code keeps nothing in rsi. */
gp_handler:
        mov     rsi, [rsp + 8]                  /* faulting RIP */
        cmp     byte ptr [rsi], 0xee
        jne     3f
        out     dx, al
        inc     qword ptr [rsp + 8]
        pop     rsi                             /* drop the error code */
        iretq
3:      hlt
        jmp     3b

/* ------------------------------------------------------------- CPL 3 */
user_entry:
        mov     al, 'S'
        call    putc
        mov     rdi, [rip + p_start]
        mov     rcx, [rip + p_size]
        mov     bl, [rip + p_mode]
        dec     bl
        jz      fill
        dec     bl
        jz      dirty
idle:
        hlt                                     /* faults: the handler halts for good */

fill:
        mov     al, 0xa5
        rep stosb
        mov     al, 'F'
        call    putc
        jmp     idle

dirty:
        mov     r12, rdi                        /* range start */
        lea     r13, [rdi + rcx]                /* range end */
        mov     r8, [rip + p_ticks]             /* TSC ticks per page; 0: unpaced */
        rdtsc
        shl     rdx, 32
        or      rax, rdx
        mov     r9, rax                         /* next deadline */
        mov     r14, [rip + s_pass]
pass:
        inc     r14
        mov     rdi, r12
        xor     r15d, r15d                      /* a mismatch this pass */
page:
        lea     rax, [r14 - 1]                  /* memory starts zeroed: pass 1 expects 0 */
        cmp     [rdi], rax
        je      6f
        inc     qword ptr [rip + s_mismatch]
        inc     r15d
6:      mov     [rdi], r14
        add     edi, 4096
        test    r8, r8
        jz      8f
        add     r9, r8
7:      rdtsc
        shl     rdx, 32
        or      rax, rdx
        mov     rdx, rax
        sub     rdx, r9
        cmp     rdx, r8                         /* far behind (e.g. after a stop): */
        jle     71f                             /* do not catch up in a burst */
        mov     r9, rax
71:     cmp     rax, r9
        jb      7b
8:      cmp     rdi, r13
        jb      page
        mov     [rip + s_pass], r14
        mov     eax, r14d
        and     al, 15
        add     al, 'A'
        test    r15d, r15d                      /* a bad pass prints "!" for its letter */
        jz      9f
        mov     al, '!'
9:      call    putc
        jmp     pass

putc:
        mov     dx, SERIAL
        out     dx, al                          /* faults to gp_handler, which does it */
        ret

/* The GDT; its null descriptor holds the GDTR. */
        .p2align 3
gdt:
        .word   gdt_end - gdt - 1
        .long   gdt
        .word   0
        .quad   0x00209a0000000000              /* 0x08 kernel code, 64-bit */
        .quad   0x0000f20000000000              /* 0x10 user data */
        .quad   0x0020fa0000000000              /* 0x18 user code, 64-bit */
        .quad   0x0000890000000067 + (TSS << 16) /* 0x20 TSS, 104 bytes */
        .quad   0
gdt_end:
idtr:
        .word   14 * 16 - 1
        .long   IDT

/* ------------------------------------------------------------- parameter block
 * Patched by vmm and the bench (vmm/src/guest.rs describes the layout). */
        .org    0x1be
params:
        .ascii  "MIGT"                          /* magic */
p_mode: .byte   2                               /* 0 idle, 1 fill, 2 dirty */
        .byte   1                               /* parameter block version */
        .word   0
p_start:
        .quad   0x200000                        /* range start: 2 MiB */
p_size: .quad   0x4000000                       /* range size: 64 MiB */
p_rate: .long   0                               /* pages per second; 0: as fast as possible */
p_tsc_khz:
        .long   0                               /* TSC frequency in kHz */
p_ticks:
        .quad   0                               /* TSC ticks per page: tsc_khz * 1000 / rate */
s_pass: .quad   0                               /* status: passes completed */
s_mismatch:
        .quad   0                               /* status: pages found stale */
        .org    0x1fe
        .byte   0x55, 0xaa
