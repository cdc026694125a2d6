/* consnap workload guest: the kernel part.
 *
 * Everything that runs in ring 0 is here, in assembly, because on kvm_pvm
 * guest kernel code is emulated one instruction at a time (and the emulator
 * lacks SSE forms a compiler might pick). The kernel part:
 *   - enters at the PVH entry (32-bit protected mode, paging off, EBX = start_info),
 *   - switches to long mode with static page tables (4 GiB identity map, 2 MiB
 *     pages, all user-accessible),
 *   - loads GDT, IDT and a per-CPU TSS whose I/O bitmap lets ring 3 use the
 *     serial port, the debug-exit port and the PIT,
 *   - on KVM, registers a per-CPU kvmclock (pvclock) slot that ring 3 reads
 *     for time (see main.rs),
 *   - drops to ring 3 (iretq, IF=0) into the Rust workload code.
 * Ring 3 reaches ring 0 only by executing HLT (a #GP at CPL 3) with a request
 * number in RAX: 0 parks the CPU for good, 1 starts the application processors,
 * 2 waits for an interrupt (the disk driver's irq=on mode, virtio.rs).
 * Any other exception prints its vector and RIP on COM1 and exits with code 4.
 * The only interrupts are those request 2 waits for: vector 0x20 (the disk,
 * routed by ring 3 through the IOAPIC; its handler sends the local APIC an
 * EOI) and the local APIC's spurious vector 0x2f; ring 3 runs with IF=0.
 */

.set KCODE64, 0x08
.set KDATA,   0x10
.set KCODE32, 0x18
.set UDATA,   0x23
.set UCODE64, 0x2b
.set TSS0,    0x30
.set MAX_CPUS, 8
.set KSTACK_SIZE, 0x4000
.set USTACK_SIZE, 0x40000
.set TSS_STRIDE, 512
.set TSS_LIMIT, 104 + 193 - 1
.set AP_TRAMP, 0x8000
.set COM1, 0x3f8
.set DEBUG_EXIT, 0x501
.set EXIT_FAULT, 4
.set MSR_KVM_SYSTEM_TIME_NEW, 0x4b564d01
.set KVM_FEATURE_CLOCKSOURCE2, 0x8
.set PVCLOCK_SLOT, 32
.set IRQ_VECTOR, 0x20
.set SPURIOUS_VECTOR, 0x2f
.set IDT_ENTRIES, 0x30
.set LAPIC_EOI, 0xFEE000B0

/* ---------------------------------------------------------------- PVH note */
.section .note.Xen, "a", @note
.balign 4
.long 4                 /* name size */
.long 4                 /* desc size */
.long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
.asciz "Xen"
.balign 4
.long pvh_start

/* ------------------------------------------------------- 32-bit entry code */
.section .text.boot, "ax"
.code32
.globl pvh_start
pvh_start:
    cli
    cld
    movl %ebx, %esi                 /* start_info (kept in ESI) */
    lgdt gdt_ptr
    movl $bsp64, %edi
    /* fall through */

/* Common path to long mode. EDI = 64-bit continuation. */
to_long_mode:
    movl %cr4, %eax
    orl $0x620, %eax                /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx          /* EFER */
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0x9FFFFFF3, %eax          /* clear CD, NW, TS, EM */
    orl $0x80000023, %eax           /* PG | NE | MP | PE */
    movl %eax, %cr0
    ljmp $KCODE64, $long_mode

/* AP arrives here from the real-mode trampoline, in protected mode. */
ap32:
    movw $KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %esi, %esi
    movl $ap64, %edi
    jmp to_long_mode

/* ------------------------------------------------------------ 64-bit code */
.code64
long_mode:
    movw $KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movl %edi, %edi
    jmp *%rdi

bsp64:
    movq $kstacks + KSTACK_SIZE, %rsp
    movl %esi, %esi
    movq %rsi, pvh_start_info(%rip)
    call setup_tables
    xorl %edi, %edi
    jmp enter_cpu

ap64:
    movl $1, %eax
    lock xaddl %eax, next_cpu(%rip)
    cmpl $MAX_CPUS, %eax
    jae park
    movl %eax, %edi
    leal 1(%eax), %ecx
    shll $14, %ecx                  /* (index + 1) * KSTACK_SIZE */
    leaq kstacks(%rip), %rsp
    addq %rcx, %rsp
    jmp enter_cpu

/* EDI = CPU index. Loads this CPU's tables and drops to ring 3. */
enter_cpu:
    lgdt gdt_ptr(%rip)
    lidt idt_ptr(%rip)
    movl %edi, %eax
    shll $4, %eax
    addl $TSS0, %eax
    ltr %ax
    /* kvmclock, if CPUID says KVM ("KVMKVMKVM\0\0\0") with
     * KVM_FEATURE_CLOCKSOURCE2: MSR_KVM_SYSTEM_TIME_NEW = this CPU's slot | 1. */
    movl $0x40000000, %eax
    cpuid
    cmpl $0x4b4d564b, %ebx
    jne 1f
    cmpl $0x564b4d56, %ecx
    jne 1f
    cmpl $0x4d, %edx
    jne 1f
    movl $0x40000001, %eax
    cpuid
    testb $KVM_FEATURE_CLOCKSOURCE2, %al
    jz 1f
    movl %edi, %eax
    shll $5, %eax                   /* index * PVCLOCK_SLOT */
    addl $pvclock_slots + 1, %eax
    xorl %edx, %edx
    movl $MSR_KVM_SYSTEM_TIME_NEW, %ecx
    wrmsr
1:
    leal 1(%edi), %ecx
    shll $18, %ecx                  /* (index + 1) * USTACK_SIZE */
    leaq ustacks(%rip), %rax
    addq %rcx, %rax
    subq $8, %rax                   /* as if a return address were pushed */
    pushq $UDATA
    pushq %rax
    pushq $0x2                      /* RFLAGS: IF=0, IOPL=0 */
    pushq $UCODE64
    leaq user_entry(%rip), %rax
    pushq %rax
    movq pvh_start_info(%rip), %rsi
    xorl %eax, %eax
    xorl %ebx, %ebx
    xorl %ecx, %ecx
    xorl %edx, %edx
    xorl %ebp, %ebp
    iretq

/* Build the TSS descriptors and the IDT (addresses need splitting at run time). */
setup_tables:
    xorl %ecx, %ecx
    leaq tss_area(%rip), %rsi
    leaq gdt + TSS0(%rip), %rdi
1:  movq %rsi, %rax
    movl %eax, %edx
    shll $16, %edx
    orl $TSS_LIMIT, %edx            /* limit[15:0] | base[15:0] << 16 */
    movl %eax, %ebx
    shrl $16, %ebx
    andl $0xff, %ebx
    orl $0x8900, %ebx               /* present, type 9 (available 64-bit TSS) */
    movl %eax, %r8d
    andl $0xff000000, %r8d
    orl %r8d, %ebx
    movl %edx, (%rdi)
    movl %ebx, 4(%rdi)
    shrq $32, %rax
    movl %eax, 8(%rdi)
    movl $0, 12(%rdi)
    addq $TSS_STRIDE, %rsi
    addq $16, %rdi
    incl %ecx
    cmpl $MAX_CPUS, %ecx
    jb 1b

    xorl %ecx, %ecx
    leaq isr_stubs(%rip), %rsi
    leaq idt(%rip), %rdi
    movabsq $0x00008E0000000000 + (KCODE64 << 16), %r9
2:  call set_gate
    addq $16, %rsi
    addq $16, %rdi
    incl %ecx
    cmpl $32, %ecx
    jb 2b
    leaq irq_stub(%rip), %rsi
    leaq idt + IRQ_VECTOR * 16(%rip), %rdi
    call set_gate
    leaq spurious_stub(%rip), %rsi
    leaq idt + SPURIOUS_VECTOR * 16(%rip), %rdi
    /* fall through */

/* IDT entry at RDI: interrupt gate to RSI (R9 = type and selector bits). */
set_gate:
    movq %rsi, %rax
    movq %rax, %rdx
    andl $0xffff, %edx
    orq %r9, %rdx
    movq %rax, %r8
    shrq $16, %r8
    andl $0xffff, %r8d
    shlq $48, %r8
    orq %r8, %rdx
    movq %rdx, (%rdi)
    shrq $32, %rax
    movq %rax, 8(%rdi)
    ret

/* The disk's interrupt, taken only inside request 2 (HLT with IF=1): EOI
 * to the local APIC, then back to the CLI after that HLT. */
irq_stub:
    pushq %rax
    movl $LAPIC_EOI, %eax
    movl $0, (%rax)
    popq %rax
    iretq

/* The local APIC's spurious interrupt needs no EOI. */
spurious_stub:
    iretq

/* ------------------------------------------------------ exception entry */
.balign 16
isr_stubs:
.set vec, 0
.rept 32
    .balign 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
.endr

/* Frame after the pushes below (offsets from RSP):
 *   0 r15 .. 112 rax, 120 vector, 128 error, 136 rip, 144 cs, 152 rflags, 160 rsp, 168 ss */
isr_common:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rbx
    pushq %rbp
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    cmpq $13, 120(%rsp)
    jne fatal
    testq $3, 144(%rsp)
    jz fatal
    movq 136(%rsp), %rbx
    cmpb $0xF4, (%rbx)              /* HLT from ring 3: a request */
    jne fatal
    movq 112(%rsp), %rax
    testq %rax, %rax
    jz park
    cmpq $1, %rax
    je start_aps
    cmpq $2, %rax
    je wait_irq
    jmp fatal

request_done:
    incq 136(%rsp)                  /* skip the HLT */
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rbp
    popq %rbx
    popq %rdx
    popq %rcx
    popq %rax
    addq $16, %rsp
    iretq

park:
    cli
3:  hlt
    jmp 3b

/* Request 2: wait for an interrupt. STI's one-instruction shadow covers the
 * HLT, so an interrupt that became pending while ring 3 ran (IF=0) wakes it
 * at once instead of being lost. */
wait_irq:
    sti
    hlt
    cli
    jmp request_done

/* INIT-SIPI-SIPI to all other CPUs; they run ap_tramp at 0x8000. */
start_aps:
    leaq ap_tramp(%rip), %rsi
    movl $AP_TRAMP, %edi
    movl $(ap_tramp_end - ap_tramp), %ecx
    rep movsb
    movl $0xFEE00300, %edi          /* LAPIC ICR low */
    movl $0x000C4500, (%rdi)        /* INIT, assert, all excluding self */
    call icr_wait
    movl $0x000C4600 + (AP_TRAMP >> 12), (%rdi)   /* SIPI */
    call icr_wait
    movl $0x000C4600 + (AP_TRAMP >> 12), (%rdi)
    call icr_wait
    jmp request_done

icr_wait:
    movl $2000, %ecx
4:  pause
    testl $0x1000, (%rdi)           /* delivery status */
    jz 5f
    loop 4b
5:  ret

fatal:
    leaq msg_fault(%rip), %rsi
    call kputs
    movq 120(%rsp), %rax
    call kputhex
    leaq msg_err(%rip), %rsi
    call kputs
    movq 128(%rsp), %rax
    call kputhex
    leaq msg_rip(%rip), %rsi
    call kputs
    movq 136(%rsp), %rax
    call kputhex
    leaq msg_cr2(%rip), %rsi
    call kputs
    movq %cr2, %rax
    call kputhex
    movb $'\n', %al
    call kputc
    movw $DEBUG_EXIT, %dx
    movb $EXIT_FAULT, %al
    outb %al, %dx
    jmp park

kputc:
    movw $COM1, %dx
    outb %al, %dx
    ret

kputs:
    lodsb
    testb %al, %al
    jz 6f
    call kputc
    jmp kputs
6:  ret

kputhex:
    movq %rax, %rbx
    movl $16, %ecx
7:  rolq $4, %rbx
    movl %ebx, %eax
    andl $0xf, %eax
    cmpb $10, %al
    jb 8f
    addb $('a' - '0' - 10), %al
8:  addb $'0', %al
    call kputc
    decl %ecx
    jnz 7b
    ret

/* ------------------------------------------ AP trampoline (copied to 0x8000) */
.code16
ap_tramp:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl AP_TRAMP + (ap_tramp_gdt - ap_tramp)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $KCODE32, $ap32
.balign 8
ap_tramp_gdt:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:
.code64

.section .rodata.boot, "a"
msg_fault: .asciz "\nconsnap-guest: CPU exception vector=0x"
msg_err:   .asciz " error=0x"
msg_rip:   .asciz " rip=0x"
msg_cr2:   .asciz " cr2=0x"

/* ------------------------------------------------------------------- data */
.section .data.pagetables, "aw"
.balign 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
pd:
.set page, 0
.rept 2048
    .quad (page << 21) | 0x87       /* present, writable, user, 2 MiB */
    .set page, page + 1
.endr

.section .data, "aw"
.balign 16
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF        /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
    .quad 0x00CF9A000000FFFF        /* 0x18 kernel code, 32-bit (AP bring-up) */
    .quad 0x00CFF2000000FFFF        /* 0x20 user data */
    .quad 0x00AFFA000000FFFF        /* 0x28 user code, 64-bit */
    .fill MAX_CPUS * 2, 8, 0        /* 0x30 TSS descriptors, filled at boot */
gdt_end:

.balign 16
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

.balign 16
idt_ptr:
    .word IDT_ENTRIES * 16 - 1
    .quad idt

.balign 8
.globl pvh_start_info
pvh_start_info:
    .quad 0
next_cpu:
    .long 1

.balign TSS_STRIDE
tss_area:
.set cpu, 0
.rept MAX_CPUS
    .balign TSS_STRIDE
    .long 0
    .quad kstacks + KSTACK_SIZE * (cpu + 1)   /* rsp0 */
    .fill 11, 8, 0
    .word 0
    .word 104                       /* I/O bitmap offset */
    .set port8, 0
    .rept 192                       /* ports 0x000-0x5ff; a clear bit allows access */
        .if port8 == 0x08
        .byte 0xF0                  /* 0x40-0x43 PIT */
        .elseif port8 == 0x0C
        .byte 0xFD                  /* 0x61 PIT gate */
        .elseif port8 == 0x7F
        .byte 0x00                  /* 0x3f8-0x3ff COM1 */
        .elseif port8 == 0xA0
        .byte 0xF1                  /* 0x501 debug exit, 0x502-0x503 idle */
        .else
        .byte 0xFF
        .endif
        .set port8, port8 + 1
    .endr
    .byte 0xFF
    .set cpu, cpu + 1
.endr

.section .bss, "aw", @nobits
.balign 4096
idt:
    .skip IDT_ENTRIES * 16
/* One pvclock_vcpu_time_info per CPU, written by KVM, read by ring 3; the
 * 256 bytes sit in one page, as KVM requires. */
.balign 256
.globl pvclock_slots
pvclock_slots:
    .skip PVCLOCK_SLOT * MAX_CPUS
.balign 4096
kstacks:
    .skip KSTACK_SIZE * MAX_CPUS
.balign 4096
ustacks:
    .skip USTACK_SIZE * MAX_CPUS
